"""The `khofs` command: a thin main over one module per command family."""

import argparse
import os
import sys

from . import ctl, image, instances, kexec, memmap, mount, record, run, show
from .common import EXIT_OK, EXIT_USAGE
from .mount8 import helper_argv, split_mount_options  # noqa: F401  (public: tests, mount(8))


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, subcommand by subcommand."""
    p = argparse.ArgumentParser(
        prog="khofs", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="khofs: Linux Kexec HandOver (KHO) debugfs, emulated over FUSE. The mount "
        "shows <MNT>/kho/... as /sys/kernel/debug/kho/... would.",
        epilog="examples:\n"
        "  khofs mount /tmp/khofs --cmdline 'kho=on reserve_mem=4M:4096:oops'\n"
        "  echo 1 > /tmp/khofs/kho/out/finalize; dtc -I dtb -O dts /tmp/khofs/kho/out/fdt\n"
        "  khofs kexec /tmp/khofs; ls /tmp/khofs/kho/in/sub_fdts\n"
        "  khofs umount /tmp/khofs\n\n"
        "Each command has its own --help. Exit status: 0 success, 1 failure (the reason is on\n"
        "stderr), 2 usage error. Also run by mount(8) as: khofs SOURCE MOUNTPOINT -o OPTIONS")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in (mount.add_mount, instances.add_umount, instances.add_list, mount.add_reboot,
                kexec.add_kexec, show.add_dump, show.add_diff, memmap.add_map, record.add_record,
                instances.add_status, ctl.add_ctl, run.add_run, image.add_image):
        add(sub)
    p.commands = frozenset(sub.choices)      # what mount(8)'s SOURCE never is
    _own_usage(p)
    return p


def _own_usage(parser) -> None:
    """Each (sub)command parser records itself, so arguments left over after the deepest
    one are refused with that subcommand's usage, not the top-level one."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                child.set_defaults(_parser=child)
                _own_usage(child)


def main(argv=None) -> int:
    """Run one khofs command; its exit status."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    argv = helper_argv(argv, parser.commands) or argv
    args, extra = parser.parse_known_args(argv)
    if extra:
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
