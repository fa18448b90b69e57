"""khofs mount: boot an emulated kernel and serve its debugfs (instances.py: the rest of a
daemon's life)."""

import argparse
import json
import os
import sys

from .. import runtime
from ..kernel.boot import DEFAULT_BOOT_RESERVED, DEFAULT_MEMORY
from ..kernel.profile import PROFILES
from .common import (EXIT_FAIL, EXIT_OK, EXIT_USAGE, client, err, errno_name, kernels_differ,
                     release_arg, size_arg)


def cmd_mount(args) -> int:
    """khofs mount MNT: boot an emulated kernel and serve its debugfs there."""
    mnt = os.path.realpath(args.mountpoint)
    if not os.path.isdir(mnt):
        if os.path.exists(mnt):
            err(f"mount point {args.mountpoint} is not a directory (khofs mounts on a directory)")
        else:
            err(f"mount point {args.mountpoint} does not exist (create it with mkdir)")
        return EXIT_FAIL
    if runtime.find_mount(mnt):
        err(f"{mnt} is already a mount point (khofs umount {args.mountpoint} first)")
        return EXIT_FAIL
    why = kernels_differ(args.abi, args.release)
    if why:
        err(why)
        return EXIT_USAGE
    args.handover = None
    if args.replay:
        # Read and check the snapshot before the daemon starts: a bad one is one clear line.
        from ..devicetree.snapshot import SnapshotError
        try:
            args.handover = _replay_handover(args)
        except (SnapshotError, ValueError) as e:
            err(str(e))
            return EXIT_FAIL
    args.cmdline = args.cmdline if args.cmdline is not None else "kho=on"
    args.memory = args.memory or DEFAULT_MEMORY
    args.nodes = args.nodes if args.nodes is not None else 1
    if args.foreground:
        return _mount_foreground(args, mnt)
    return _mount_background(args, mnt)


def _replay_handover(args):
    """The handover a snapshot's successor boots from; the unset options take the recording's
    (its command line and ABI, enough memory and nodes for its addresses and scratch areas)."""
    from ..devicetree.snapshot import load, recording
    from ..kernel.machine import MachineConfig
    from ..kernel.profile import release_profile_name
    from ..kernel.replay import replay_handover
    path = os.path.abspath(args.replay)
    rec = recording(load(path), path)
    memory = args.memory
    if memory is None:
        memory, need = rec.memory or DEFAULT_MEMORY, rec.plan.extent
        while memory < need:
            memory <<= 1
    nodes = args.nodes if args.nodes is not None else rec.nodes or max(1, len(rec.scratch) - 2)
    cfg = MachineConfig(memory=memory, nodes=nodes,
                        boot_reserved=args.boot_reserved,
                        abi=args.abi or release_profile_name(args.release) or rec.abi)
    cmdline = args.cmdline if args.cmdline is not None else rec.cmdline or "kho=on"
    return replay_handover(rec, cmdline, cfg, args.release)


def boot_args(args):
    """The BootArgs of a mount's options (defaults already filled in)."""
    from ..kernel.boot import BootArgs
    return BootArgs(args.cmdline, args.abi, args.release, args.memory, args.nodes,
                    args.boot_reserved, args.handover)


def _boot_host(args):
    from ..daemon.host import Host
    state = os.path.abspath(args.state) if args.state else None
    return Host.boot(boot_args(args), state, log=lambda text: print(text, file=sys.stderr,
                                                                     flush=True))


def _mount_foreground(args, mnt) -> int:
    from ..daemon.serve import hold_signals, report
    hold_signals()
    lock = runtime.lock_mountpoint(mnt)
    if lock is None:
        msg = f"another khofs daemon is mounting or serving {mnt} (khofs umount {mnt} first)"
        report(args.ready_fd, error=msg)
        err(msg)
        return EXIT_FAIL
    try:
        return _serve_locked(args, mnt)
    finally:
        runtime.unlock_mountpoint(mnt, lock)


def _serve_locked(args, mnt) -> int:
    from ..daemon.serve import Daemon, report
    fd = args.ready_fd
    if runtime.find_mount(mnt):
        msg = f"{mnt} is already a mount point (khofs umount {mnt} first)"
        report(fd, error=msg)
        err(msg)
        return EXIT_FAIL
    # What start-up made lives as long as the daemon: the collector need never scan it again.
    # A boot's objects hold reference cycles, so a kexec or reboot ends in a full collection,
    # which then costs only what the boots made.
    import gc
    gc.freeze()
    try:
        host = _boot_host(args)
    except (ValueError, OSError) as e:
        report(fd, error=str(e))
        err(str(e))
        return EXIT_USAGE
    told = host.boot_report()
    if fd is not None:
        for line in told["replay"]:
            report(fd, stderr=f"khofs: replay: {line}")
        for line in told["warnings"]:
            report(fd, stderr=f"kernel: {line}")
        for why in told["ignored"]:
            report(fd, stderr=f"khofs: {why}")
        for note in told["kexec_notes"]:
            report(fd, stderr=f"khofs: kexec: {note}")
    else:
        for why in told["ignored"]:
            err(why)
    opts = [o for o in (args.options or "").split(",") if o]
    daemon = Daemon(mnt, host, stat_size=args.stat_size, fuse_options=opts,
                    debug_fuse=args.debug_fuse, cache=args.cache)
    try:
        _libfuse_says(daemon.mount)
    except _MountFailed as e:
        report(fd, error=f"cannot mount on {mnt}: {e}")
        err(f"cannot mount on {mnt}: {e}")
        return EXIT_FAIL
    runtime.write_info(mnt, pid=os.getpid(), sock=daemon.sock_path,
                       state=os.path.abspath(args.state) if args.state else None)

    def ready():
        report(fd, ready=True, pid=os.getpid())
        if fd is not None:
            os.close(fd)
    daemon.run(ready)
    if daemon.signalled and not daemon.ready and fd is not None:
        # `khofs mount` is still waiting: one line instead of "exited before ready".
        report(fd, error=f"the daemon was stopped by signal {daemon.signalled} before the "
               "mount was ready; unmounted")
    return EXIT_OK


class _MountFailed(Exception):
    """libfuse refused the mount; the message is its own reason."""


def _libfuse_says(mount) -> None:
    """Run mount() with fd 2 caught: libfuse prints why it refuses (an unknown -o option, a
    mount point in use) on stderr and pyfuse3 only says which call failed. Anything
    libfuse says on a mount that works is passed on."""
    import tempfile
    saved = os.dup(2)
    with tempfile.TemporaryFile() as cap:
        sys.stderr.flush()
        os.dup2(cap.fileno(), 2)
        try:
            mount()
        except Exception as e:
            failed = e
        else:
            failed = None
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        cap.seek(0)
        said = cap.read().decode(errors="replace").strip()
    if failed is not None:
        lines = [ln.removeprefix("fuse: ").strip() for ln in said.splitlines() if ln.strip()]
        raise _MountFailed("; ".join(lines) if lines else str(failed)) from None
    if said:
        print(said, file=sys.stderr, flush=True)


def _mount_background(args, mnt) -> int:
    rfd, wfd = os.pipe()
    log_path = runtime.paths(mnt)["log"]
    pid = os.fork()
    if pid == 0:
        # The daemon: stdio to the log, readiness through the pipe. Its own process group
        # keeps the terminal's Ctrl-C and hangup of the caller's job away from it. It stays
        # in the caller's session: with autogroup scheduling a new session is a new group,
        # and a reader and the daemon taking turns on one CPU would then cross groups on
        # every request (about a tenth slower), where debugfs runs in the reader's context.
        code = EXIT_FAIL
        try:
            os.close(rfd)
            devnull = os.open(os.devnull, os.O_RDONLY)
            logfd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.dup2(devnull, 0)
            os.dup2(logfd, 1)
            os.dup2(logfd, 2)
            os.close(devnull)
            os.close(logfd)
            # Only once nothing can reach the terminal: a background group writing to it
            # would be stopped (SIGTTOU under `stty tostop`) with the parent waiting.
            os.setpgid(0, 0)
            args.ready_fd = wfd
            code = _mount_foreground(args, mnt)
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(wfd)
    ok = said = False
    with os.fdopen(rfd) as r:
        for line in r:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "stderr" in msg:
                print(msg["stderr"], file=sys.stderr)
            if "error" in msg:
                err(msg["error"])
                said = True
            if msg.get("ready"):
                ok = True
                break
    if not ok:
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if not said:        # the daemon's own error line says it all
            err(f"the daemon exited (status {status}) before the mount was ready; "
                f"log: {log_path}")
        return EXIT_FAIL
    return EXIT_OK


def cmd_reboot(args) -> int:
    """khofs reboot MNT: a cold boot in place, as a fresh mount with these options boots."""
    from ..client import ControlError
    fields = {k: getattr(args, k) for k in ("cmdline", "abi", "release", "memory", "nodes",
                                            "boot_reserved", "stat_size", "cache", "options",
                                            "state", "replay")
              if getattr(args, k) is not None}
    try:
        with client(args.mountpoint) as c:
            r = c.call("reboot", **fields)
    except ControlError as e:
        err(f"reboot: {e.strerror} [{errno_name(e.errno)}]")
        return EXIT_FAIL
    for why in r["ignored"]:
        err(why)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        for line in r["log"]:
            print(line)
    return EXIT_OK


def add_mount(sub) -> None:
    """The mount subcommand."""
    m = sub.add_parser("mount", help="mount an emulated KHO debugfs",
                       description="Boot an emulated kernel with the given command line and mount "
                       "its debugfs at MOUNTPOINT. Returns once the mount is ready.")
    m.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing directory")
    m.add_argument("--cmdline",
                   help='kernel command line (default "kho=on"; with --replay, the recorded '
                   "one); kho=, kho_scratch=, reserve_mem= and khofs.test_kho=1 (load the KHO "
                   "test module at boot) are understood")
    m.add_argument("--memory", type=size_arg, metavar="SIZE",
                   help="simulated RAM (default 4G, or with --replay enough for the recorded "
                   "addresses)")
    m.add_argument("--nodes", type=int, metavar="N",
                   help="NUMA nodes; memory is split evenly (default 1; with --replay, one per "
                   "recorded per-node scratch area)")
    m.add_argument("--boot-reserved", type=size_arg, default=DEFAULT_BOOT_RESERVED, metavar="SIZE",
                   help="memory the kernel reserved for itself at boot, at 16 MiB; drives the "
                   "default scratch scale (default 64M)")
    m.add_argument("--abi", choices=list(PROFILES),
                   help="kernel ABI profile: 6.16 (v6.16-v6.17), 6.18, 7.0 (v6.19-v7.0), "
                   "7.1, 7.2 (v7.2-v7.3), 7.4 (v7.4+) (default: the one --release names, else "
                   "6.18; with --replay, the recorded kernel's)")
    m.add_argument("--release", type=release_arg, metavar="R",
                   help="uname -r of the emulated kernel; its version picks the profile "
                   "(7.2.3 runs 7.2, 6.12.0 a kernel without KHO); one without a version "
                   "(my-kernel) is only the name (default: the profile's, e.g. 7.1.0-khofs)")
    m.add_argument("--stat-size", choices=["content", "zero"], default="content",
                   help="st_size of files: their content length (default, so sendfile users "
                   "work) or 0 as debugfs reports")
    m.add_argument("--cache", choices=["direct", "page"], default="direct",
                   help="direct (default): every read asks the emulated kernel and "
                   "mmap(MAP_SHARED) fails with ENODEV as on debugfs; page: read-only opens "
                   "keep the page cache while the content is unchanged (faster; mmap works, and a "
                   "read racing an O_TRUNC write of the same file may find it empty or short)")
    m.add_argument("-o", dest="options", metavar="OPTS",
                   help="FUSE mount options, comma separated (e.g. allow_other,auto_unmount)")
    m.add_argument("--state", metavar="DIR",
                   help="keep each kexec's handover in DIR (created 0700); a mount on a DIR "
                   "that holds one boots from it")
    m.add_argument("--replay", metavar="SNAPSHOT",
                   help="boot as the next kernel of the one recorded in SNAPSHOT (khofs "
                   "record): its out/fdt and sub-blobs become in/, its scratch areas are reused")
    m.add_argument("--foreground", "-f", action="store_true", help="stay attached")
    m.add_argument("--debug-fuse", action="store_true", help="log every FUSE request")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    m.set_defaults(func=cmd_mount)


def add_reboot(sub) -> None:
    """The reboot subcommand."""
    r = sub.add_parser("reboot", help="cold-boot the emulated kernel in place",
                       description="Boot MOUNTPOINT's machine anew, as a fresh `khofs mount` with "
                       "the same options would: nothing preserved, no kexec count, no loaded "
                       "image, the state dir's handover dropped. Options not given keep the "
                       "mount's. Files opened before the reboot read EIO and stat with nlink "
                       "0, as after a kexec. The FUSE options, --state and --replay cannot "
                       "change in a reboot.")
    r.add_argument("mountpoint", metavar="MOUNTPOINT", help="a khofs mount point")
    r.add_argument("--cmdline", help="kernel command line (default: the mount's)")
    r.add_argument("--abi", choices=list(PROFILES), help="kernel ABI profile (default: the mount's)")
    r.add_argument("--release", type=release_arg, metavar="R",
                   help="uname -r (default: the mount's)")
    r.add_argument("--memory", type=size_arg, metavar="SIZE", help="simulated RAM")
    r.add_argument("--nodes", type=int, metavar="N", help="NUMA nodes")
    r.add_argument("--boot-reserved", type=size_arg, metavar="SIZE",
                   help="memory the kernel reserved for itself at boot")
    # Accepted only to be refused with the reason: they belong to the mount, not the boot.
    r.add_argument("--stat-size", help=argparse.SUPPRESS)
    r.add_argument("--cache", help=argparse.SUPPRESS)
    r.add_argument("-o", dest="options", help=argparse.SUPPRESS)
    r.add_argument("--state", help=argparse.SUPPRESS)
    r.add_argument("--replay", help=argparse.SUPPRESS)
    r.add_argument("--json", action="store_true", help="print the result as JSON")
    r.set_defaults(func=cmd_reboot)
