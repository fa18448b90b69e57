"""khofs run MNT -- CMD: a tool runs unmodified on the emulated machine."""

import argparse

from .common import EXIT_USAGE, err


def cmd_run(args) -> int:
    """khofs run MNT [--] CMD [ARGS...]."""
    words = list(args.words)
    if words and words[0] == "--":
        words = words[1:]
    from ..run import run
    try:
        status, _, _ = run(args.mountpoint, words)
    except ValueError as e:
        err(str(e))
        return EXIT_USAGE
    return status


def add_run(sub) -> None:
    """The run subcommand."""
    r = sub.add_parser(
        "run", help="run a tool unmodified on the emulated machine (its kexec included)",
        description="khofs run MNT -- CMD runs CMD as root in private mount and PID "
        "namespaces where /sys/kernel/debug is MNT, /proc/cmdline, uname -r and "
        "/sys/kernel/kexec_loaded show the emulated kernel, and kexec_file_load(2), "
        "kexec_load(2) and reboot(2) are answered by it. A kexec reboot ends the run: its "
        "processes end, the new kernel's boot lines go to stderr, and the exit status is 0. "
        "Otherwise the exit status is CMD's. See docs/run.md.")
    r.add_argument("mountpoint", metavar="MOUNTPOINT", help="a khofs mount point")
    r.add_argument("words", nargs=argparse.REMAINDER, metavar="CMD [ARGS...]",
                   help="the command (after an optional --)")
    r.set_defaults(func=cmd_run)
