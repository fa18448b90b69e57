"""The `khofs` command."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from . import runtime

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _size(text: str) -> int:
    from .kernel.kstrtox import memparse
    val, n = memparse(text)
    if n != len(text.encode()) or val <= 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 4G, 512M, 0x100000)")
    return val


def _err(msg: str) -> None:
    print(f"khofs: {msg}", file=sys.stderr)


# -- mount --------------------------------------------------------------------------
def cmd_mount(args) -> int:
    mnt = os.path.realpath(args.mountpoint)
    if not os.path.isdir(mnt):
        _err(f"mount point {args.mountpoint} is not a directory (create it with mkdir)")
        return EXIT_FAIL
    if runtime.find_mount(mnt):
        _err(f"{mnt} is already a mount point (khofs umount {args.mountpoint} first)")
        return EXIT_FAIL
    if args.foreground:
        return _mount_foreground(args, mnt)
    return _mount_background(args, mnt)


def _build_machine(args):
    from .kernel.machine import Machine, MachineConfig
    cfg = MachineConfig(memory=args.memory, nodes=args.nodes, boot_reserved=args.boot_reserved,
                        abi=args.abi)
    return Machine(args.cmdline, cfg)


def _mount_foreground(args, mnt) -> int:
    from .daemon import Daemon, report
    fd = args.ready_fd
    try:
        machine = _build_machine(args)
    except ValueError as e:
        report(fd, error=str(e))
        _err(str(e))
        return EXIT_USAGE
    for line in machine.warnings():
        report(fd, stderr=f"kernel: {line.text}")
        if fd is None:
            print(f"kernel: {line.text}", file=sys.stderr)
    for why in machine.ignored:
        report(fd, stderr=f"khofs: {why}")
        if fd is None:
            _err(why)
    opts = [o for o in (args.options or "").split(",") if o]
    daemon = Daemon(mnt, machine, stat_size=args.stat_size, fuse_options=opts,
                    debug_fuse=args.debug_fuse)
    try:
        daemon.mount()
    except Exception as e:       # pyfuse3 raises RuntimeError with libfuse's message
        report(fd, error=f"cannot mount on {mnt}: {e}")
        _err(f"cannot mount on {mnt}: {e}")
        return EXIT_FAIL
    runtime.write_info(mnt, pid=os.getpid(), abi=args.abi, cmdline=args.cmdline)

    def ready():
        report(fd, ready=True, pid=os.getpid())
        if fd is not None:
            os.close(fd)
    daemon.run(ready)
    return EXIT_OK


def _mount_background(args, mnt) -> int:
    rfd, wfd = os.pipe()
    log_path = runtime.paths(mnt)["log"]
    argv = [sys.executable, "-m", "khofs", "mount", "--foreground", "--ready-fd", str(wfd),
            mnt, "--cmdline", args.cmdline, "--memory", str(args.memory), "--nodes", str(args.nodes),
            "--boot-reserved", str(args.boot_reserved), "--abi", args.abi,
            "--stat-size", args.stat_size]
    if args.options:
        argv += ["-o", args.options]
    if args.debug_fuse:
        argv.append("--debug-fuse")
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                pass_fds=(wfd,), start_new_session=True)
    os.close(wfd)
    ok = False
    with os.fdopen(rfd) as r:
        for line in r:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "stderr" in msg:
                print(msg["stderr"], file=sys.stderr)
            if "error" in msg:
                _err(msg["error"])
            if msg.get("ready"):
                ok = True
                break
    if not ok:
        proc.wait()
        _err(f"the daemon exited (status {proc.returncode}) before the mount was ready; log: {log_path}")
        return EXIT_FAIL
    return EXIT_OK


# -- umount -------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited: only its parent has yet to reap it.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cmd_umount(args) -> int:
    mnt = os.path.realpath(args.mountpoint)
    info = runtime.read_info(mnt)
    mounted = runtime.find_mount(mnt)
    if not mounted and not info:
        _err(f"{args.mountpoint} is not mounted")
        return EXIT_FAIL
    if mounted and not mounted[0].startswith("fuse"):
        _err(f"{args.mountpoint} is a {mounted[0]} mount, not khofs")
        return EXIT_FAIL
    if mounted:
        r = subprocess.run(["fusermount3", "-u", mnt], capture_output=True, text=True)
        if r.returncode != 0:
            if "not connected" in r.stderr or not (info and _pid_alive(info.get("pid", 0))):
                r = subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True, text=True)
            if r.returncode != 0:
                _err(f"cannot unmount {mnt}: {r.stderr.strip()}")
                return EXIT_FAIL
    pid = (info or {}).get("pid")
    if pid:
        deadline = time.monotonic() + 10
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    runtime.remove_info(mnt)
    return EXIT_OK


# -- parser -------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="khofs", description=(
        "khofs: Linux Kexec HandOver (KHO) debugfs, emulated over FUSE. The mount shows "
        "<MNT>/kho/... as /sys/kernel/debug/kho/... would."))
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser("mount", help="mount an emulated KHO debugfs",
                       description="Boot an emulated kernel with the given command line and mount "
                       "its debugfs at MOUNTPOINT. Returns once the mount is ready.")
    m.add_argument("mountpoint", metavar="MOUNTPOINT")
    m.add_argument("--cmdline", default="kho=on",
                   help='kernel command line (default "kho=on"); kho=, kho_scratch= and '
                   "reserve_mem= are understood")
    m.add_argument("--memory", type=_size, default=4 << 30, metavar="SIZE",
                   help="simulated RAM (default 4G)")
    m.add_argument("--nodes", type=int, default=1, metavar="N",
                   help="NUMA nodes; memory is split evenly (default 1)")
    m.add_argument("--boot-reserved", type=_size, default=64 << 20, metavar="SIZE",
                   help="memory the kernel reserved for itself at boot, at 16 MiB; drives the "
                   "default scratch scale (default 64M)")
    m.add_argument("--abi", choices=["6.18", "6.16"], default="6.18",
                   help="kernel ABI profile (default 6.18)")
    m.add_argument("--stat-size", choices=["content", "zero"], default="content",
                   help="st_size of files: their content length (default, so sendfile users "
                   "work) or 0 as debugfs reports")
    m.add_argument("-o", dest="options", metavar="OPTS",
                   help="FUSE mount options, comma separated (e.g. allow_other,auto_unmount)")
    m.add_argument("--foreground", "-f", action="store_true", help="stay attached")
    m.add_argument("--debug-fuse", action="store_true", help="log every FUSE request")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    m.set_defaults(func=cmd_mount)

    u = sub.add_parser("umount", help="unmount and stop the daemon (also clears a dead mount)")
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    u.set_defaults(func=cmd_umount)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
