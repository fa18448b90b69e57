"""The `khofs` command."""

import argparse
import json
import os
import signal
import sys
import time

from .. import runtime
from ..kernel.profile import DEFAULT_PROFILE, PROFILES

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _size(text: str) -> int:
    from ..kernel.kstrtox import memparse
    val, n = memparse(text)
    if n != len(text.encode()) or val <= 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 4G, 512M, 0x100000)")
    return val


def _release_arg(text: str) -> str:
    if not (0 < len(text) <= 64 and text.isprintable()):
        raise argparse.ArgumentTypeError("a release is 1 to 64 printable characters (uname -r)")
    return text


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


def _boot_host(args):
    from ..daemon.host import Host
    from ..kernel.machine import MachineConfig
    cfg = MachineConfig(memory=args.memory, nodes=args.nodes, boot_reserved=args.boot_reserved,
                        abi=args.abi, release=args.release)
    state = os.path.abspath(args.state) if args.state else None
    return Host.boot(args.cmdline, cfg, state, log=lambda text: print(text, file=sys.stderr,
                                                                       flush=True))


def _mount_foreground(args, mnt) -> int:
    from ..daemon.serve import report
    lock = runtime.lock_mountpoint(mnt)
    if lock is None:
        msg = f"another khofs daemon is mounting or serving {mnt} (khofs umount {mnt} first)"
        report(args.ready_fd, error=msg)
        _err(msg)
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
        _err(msg)
        return EXIT_FAIL
    try:
        host = _boot_host(args)
    except (ValueError, OSError) as e:
        report(fd, error=str(e))
        _err(str(e))
        return EXIT_USAGE
    machine = host.machine
    if fd is not None:
        for line in machine.warnings():
            report(fd, stderr=f"kernel: {line.text}")
        for why in machine.ignored:
            report(fd, stderr=f"khofs: {why}")
        for note in machine.kexec_notes:
            report(fd, stderr=f"khofs: kexec: {note}")
    else:
        for why in machine.ignored:
            _err(why)
    opts = [o for o in (args.options or "").split(",") if o]
    daemon = Daemon(mnt, host, stat_size=args.stat_size, fuse_options=opts,
                    debug_fuse=args.debug_fuse, cache=args.cache)
    try:
        daemon.mount()
    except Exception as e:       # libfuse's own reason is already in the log
        report(fd, error=f"cannot mount on {mnt}: {e}")
        _err(f"cannot mount on {mnt}: {e}")
        return EXIT_FAIL
    runtime.write_info(mnt, pid=os.getpid(), sock=daemon.sock_path,
                       state=os.path.abspath(args.state) if args.state else None)

    def ready():
        report(fd, ready=True, pid=os.getpid())
        if fd is not None:
            os.close(fd)
    daemon.run(ready)
    return EXIT_OK


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
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        _err(f"the daemon exited (status {status}) before the mount was ready; log: {log_path}")
        return EXIT_FAIL
    return EXIT_OK


# -- umount -------------------------------------------------------------------------
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
        import subprocess       # not at the top: every mount would pay for it
        r = subprocess.run(["fusermount3", "-u", mnt], capture_output=True, text=True)
        if r.returncode != 0:
            if "not connected" in r.stderr or not (info and runtime.pid_alive(info.get("pid", 0))):
                r = subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True, text=True)
            if r.returncode != 0:
                _err(f"cannot unmount {mnt}: {r.stderr.strip()}")
                return EXIT_FAIL
    pid = (info or {}).get("pid")
    clean = True
    if pid:
        deadline = time.monotonic() + 10
        while runtime.pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if runtime.pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            clean = False
    clean = clean and mounted is not None and info is not None
    runtime.remove_info(mnt)
    runtime.clear_stale_lock(mnt)
    if clean:
        # The daemon went down normally: its log has nothing left to explain.
        try:
            os.unlink(runtime.paths(mnt)["log"])
        except FileNotFoundError:
            pass
    return EXIT_OK


PHYS_HELP = "physical address in simulated memory (decimal or 0x hex)"
SIZE_HELP = "bytes, with an optional K/M/G suffix"


# -- control-plane commands ----------------------------------------------------------
def _client(mnt):
    from ..client import Client
    return Client(mnt)


def _num(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (decimal or 0x hex)") from None


def _load_blob(path: str) -> bytes:
    data = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()
    if data[:4] == b"\xd0\x0d\xfe\xed":
        return data
    from ..devicetree.dts import DtsError, dts_to_dtb
    try:
        return dts_to_dtb(data)
    except DtsError as e:
        raise ValueError(f"{'stdin' if path == '-' else path}: {e}") from None


def _print_result(args, result: dict, text: str | None = None) -> None:
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    elif text is not None:
        print(text)


def cmd_ctl(args) -> int:
    from ..client import ControlError
    try:
        with _client(args.mountpoint) as c:
            return _ctl(args, c)
    except ControlError as e:
        _err(f"{args.mountpoint}: {e.strerror} [{errno_name(e.errno)}]")
        return EXIT_FAIL
    except (OSError, ValueError) as e:
        _err(str(e))
        return EXIT_FAIL


def errno_name(n) -> str:
    import errno as _e
    return _e.errorcode.get(n, str(n))


def _ctl(args, c) -> int:
    import base64
    a = args.action
    if a == "mem":
        if args.mem_action == "alloc":
            r = c.call("mem_alloc", size=args.size)
            _print_result(args, r, f"0x{r['phys']:x}")
        elif args.mem_action == "free":
            c.call("mem_free", phys=args.phys)
        elif args.mem_action == "write":
            data = sys.stdin.buffer.read() if args.file == "-" else open(args.file, "rb").read()
            r = c.call("mem_write", phys=args.phys, data=base64.b64encode(data).decode())
            _print_result(args, r)
        elif args.mem_action == "read":
            sys.stdout.buffer.write(c.mem_read(args.phys, args.size))
            sys.stdout.flush()
    elif a == "subtree":
        if args.sub_action == "add":
            r = c.call("subtree_add", name=args.name,
                       blob=base64.b64encode(_load_blob(args.file)).decode(),
                       preserve=not args.no_preserve)
            _print_result(args, r, f"0x{r['phys']:x}")
        elif args.sub_action == "remove":
            c.call("subtree_remove", name=args.name)
        else:
            r = c.call("subtree_list")
            rows = [f"{s['name']}\t0x{s['phys']:x}\t{s['size']}" +
                    ("" if s["preserve"] else "\tno-preserve") for s in r["subtrees"]]
            _print_result(args, r, "\n".join(rows) or None)
    elif a == "preserve":
        c.call("preserve", phys=args.phys, size=args.size)
    elif a == "unpreserve":
        c.call("unpreserve", phys=args.phys, size=args.size)
    elif a == "preserve-folio":
        c.call("preserve_folio", phys=args.phys, order=args.order, count=args.count)
    elif a == "unpreserve-folio":
        c.call("unpreserve_folio", phys=args.phys, order=args.order)
    elif a == "fail":
        c.call("fail", op=args.op, errno=args.errno)
    elif a == "test-kho":
        c.call("test_kho", **({"seed": args.seed} if args.seed is not None else {}))
    elif a == "log":
        r = c.call("log")
        _print_result(args, r, "\n".join(r["lines"]))
    return EXIT_OK


def cmd_kexec(args) -> int:
    from ..client import ControlError
    words = args.words
    if len(words) == 1:
        step, mnt = "both", words[0]
    elif len(words) == 2 and words[0] in ("load", "exec"):
        step, mnt = words
    else:
        _err("usage: khofs kexec [load|exec] MOUNTPOINT [--cmdline ...] [--release ...]")
        return EXIT_USAGE
    fields = {}
    if args.cmdline is not None:
        fields["cmdline"] = args.cmdline
    if args.release is not None:
        fields["release"] = args.release
    if args.abi is not None:
        fields["abi"] = args.abi
    if step == "exec" and fields:
        _err("--cmdline, --release and --abi go with the load step")
        return EXIT_USAGE
    try:
        with _client(mnt) as c:
            r = c.call({"both": "kexec", "load": "kexec_load", "exec": "kexec_exec"}[step], **fields)
    except ControlError as e:
        _err(f"kexec: {e.strerror} [{errno_name(e.errno)}]")
        return EXIT_FAIL
    for note in r.get("notes", []):
        print(f"khofs: kexec: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(r, indent=2))
    elif step == "load":
        print(f"loaded {r['release']} (ABI {r['abi']}): " + ("carries the KHO handover" if r["handover"]
                                          else "carries no KHO handover"))
    else:
        for line in r["log"]:
            print(line)
    return EXIT_OK


def cmd_status(args) -> int:
    from ..client import ControlError
    try:
        with _client(args.mountpoint) as c:
            st = c.status()
    except ControlError as e:
        _err(f"{args.mountpoint}: {e.strerror}")
        return EXIT_FAIL
    if args.json:
        print(json.dumps(st, indent=2))
        return EXIT_OK
    print(f"release:          {st['release']} (ABI {st['abi']})")
    print(f"previous release: {st['previous_release'] or '-'}")
    print(f"kexec count:      {st['kexec_count']}")
    print(f"cmdline:          {st['cmdline']}")
    print(f"KHO:              {'enabled' if st['kho_enabled'] else 'disabled'}"
          f"{', handover received' if st['kho_in'] else ''}")
    fin = st["finalized"]
    print(f"finalized:        {'- (no finalize in this ABI)' if fin is None else int(fin)}")
    md = st.get("kexec_metadata")
    if md:
        print(f"kexec-metadata:   from {md['previous_release']} (count {md['kexec_count']})")
    print(f"preserved:        {st['preserved_bytes']} bytes")
    for i, s in enumerate(st["scratch"]):
        print(f"scratch[{i}]:       0x{s['addr']:x} + 0x{s['size']:x}")
    for n in st["kexec_notes"]:
        print(f"kexec note:       {n}")
    return EXIT_OK


# -- dump ------------------------------------------------------------------------------
def _mount_of(path: str):
    """The khofs mount point holding path, if its daemon left runtime info."""
    cur = os.path.realpath(path)
    while True:
        if runtime.read_info(cur):
            return cur
        parent = os.path.dirname(cur)
        if parent == cur:
            return None
        cur = parent


def _dump_targets(path: str):
    """[(label, fdt path, sub_fdts dir or None)] for a file, a mount root or a kho/ dir."""
    if os.path.isdir(path):
        kho = os.path.join(path, "kho") if os.path.isdir(os.path.join(path, "kho")) else path
        found = []
        for side in ("out", "in"):
            f = os.path.join(kho, side, "fdt")
            if os.path.exists(f):
                found.append((f, os.path.join(kho, side, "sub_fdts")))
        if not found and not os.path.isdir(os.path.join(kho, "out")):
            raise ValueError(f"{path}: no kho/ tree here (is it a khofs mount?)")
        return found
    sub = os.path.join(os.path.dirname(path), "sub_fdts")
    return [(path, sub if os.path.basename(path) == "fdt" and os.path.isdir(sub) else None)]


def cmd_dump(args) -> int:
    from ..devicetree.dump import MemorySource, decode, render
    try:
        targets = _dump_targets(args.path)
    except (OSError, ValueError) as e:
        _err(str(e))
        return EXIT_FAIL
    if args.dts:
        return _dump_dts(targets)
    mem = None
    mnt = _mount_of(args.path)
    if mnt is not None and not args.no_memory:
        try:
            c = _client(mnt)
            st = c.status()
            mem = MemorySource(c, st["memory_size"], st["preserve_bits"])
        except OSError:
            mem = None
    results = []
    try:
        for fdt_path, sub_dir in targets:
            with open(fdt_path, "rb") as f:
                blob = f.read()
            subs = {}
            if sub_dir:
                for name in sorted(os.listdir(sub_dir)):
                    with open(os.path.join(sub_dir, name), "rb") as f:
                        subs[name] = f.read()
            results.append(decode(blob, fdt_path, mem, subs))
    except OSError as e:
        _err(f"cannot read {e.filename}: {e.strerror}")
        return EXIT_FAIL
    if args.json:
        print(json.dumps(results if len(results) != 1 else results[0], indent=2))
    else:
        if not results:
            print(f"{args.path}: not finalized and no handover: no KHO FDT to show")
        print("\n\n".join(render(r) for r in results))
    return EXIT_FAIL if any(r["problems"] for r in results) else EXIT_OK


def _dump_dts(targets) -> int:
    from ..devicetree.diff import DiffError, dts_text, is_fdt
    paths = []
    for fdt_path, sub_dir in targets:
        paths.append(fdt_path)
        if sub_dir:
            paths += [os.path.join(sub_dir, n) for n in sorted(os.listdir(sub_dir))]
    out = []
    try:
        for path in paths:
            with open(path, "rb") as f:
                blob = f.read()
            head = [f"// {path}"] if len(paths) > 1 else []
            if len(paths) > 1 and os.path.dirname(path).endswith("sub_fdts") and not is_fdt(blob):
                out.append(f"// {path}: {len(blob)} bytes, not an FDT\n")
                continue
            out.append("\n".join(head + [dts_text(blob, path)]))
    except OSError as e:
        _err(f"cannot read {e.filename}: {e.strerror}")
        return EXIT_FAIL
    except DiffError as e:
        _err(str(e))
        return EXIT_FAIL
    print("\n".join(out), end="")
    return EXIT_OK


# -- diff ------------------------------------------------------------------------------
def cmd_diff(args) -> int:
    from ..devicetree.diff import DiffError, diff_paths, render
    try:
        changes = diff_paths(args.a, args.b, args.ignore_addresses)
    except DiffError as e:
        _err(str(e))
        return 2        # as diff(1): trouble
    if args.json:
        print(json.dumps({"equal": not changes, "changes": changes}, indent=2))
    else:
        for line in render(changes):
            print(line)
    return 1 if changes else EXIT_OK


# -- parser -------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
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

    m = sub.add_parser("mount", help="mount an emulated KHO debugfs",
                       description="Boot an emulated kernel with the given command line and mount "
                       "its debugfs at MOUNTPOINT. Returns once the mount is ready.")
    m.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing directory")
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
    m.add_argument("--abi", choices=list(PROFILES), default=DEFAULT_PROFILE,
                   help="kernel ABI profile: 6.16 (v6.16-v6.17), 6.18, 7.0 (v6.19-v7.0), "
                   "7.1 (v7.1+) (default 6.18)")
    m.add_argument("--release", type=_release_arg, metavar="R",
                   help="uname -r of the emulated kernel (default: the profile's, e.g. "
                   "7.1.0-khofs)")
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
    m.add_argument("--foreground", "-f", action="store_true", help="stay attached")
    m.add_argument("--debug-fuse", action="store_true", help="log every FUSE request")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    m.set_defaults(func=cmd_mount)

    u = sub.add_parser("umount", help="unmount and stop the daemon (also clears a dead mount)",
                       description="Unmount MOUNTPOINT and wait for its daemon to exit. A mount "
                       "whose daemon died (\"Transport endpoint is not connected\") is cleared "
                       "too. Fails if processes still use the mount.")
    u.add_argument("mountpoint", metavar="MOUNTPOINT", help="a khofs mount point")
    u.set_defaults(func=cmd_umount)

    k = sub.add_parser("kexec", help="kexec the emulated kernel (load and exec, or one step)",
                       description="khofs kexec MNT = kexec -s -l + kexec -e; `khofs kexec load "
                       "MNT` and `khofs kexec exec MNT` are the two steps apart. In ABI 6.18 the "
                       "handover is attached at load time, and only if finalized. --abi boots a "
                       "kernel of another release, which judges the handover as that release "
                       "would.")
    k.add_argument("words", nargs="+", metavar="[load|exec] MOUNTPOINT",
                   help="the step (both when omitted) and a khofs mount point")
    k.add_argument("--cmdline", help="command line of the next kernel (default: the current one)")
    k.add_argument("--release", help="uname -r of the next kernel")
    k.add_argument("--abi", choices=list(PROFILES),
                   help="ABI profile of the next kernel (default: the current one)")
    k.add_argument("--json", action="store_true", help="print the result as JSON")
    k.set_defaults(func=cmd_kexec)

    d = sub.add_parser("dump", help="decode and check KHO FDTs (a file, or a mounted tree)",
                       description="Decode out/fdt, in/fdt or any KHO FDT file: u64 properties "
                       "as addresses, sub-FDTs inline, and (on a khofs mount) the preserved-memory "
                       "map walked. Checks the KHO bindings; exit status 1 if anything is wrong.")
    d.add_argument("path", metavar="PATH", help="an FDT file, a khofs mount point or its kho/ dir")
    fmt = d.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true",
                     help="print JSON (schema: see khofs/devicetree/dump.py)")
    fmt.add_argument("--dts", action="store_true",
                     help="print plain device-tree source of each blob instead (no dtc needed)")
    d.add_argument("--no-memory", action="store_true",
                   help="do not read simulated memory through the control socket")
    d.set_defaults(func=cmd_dump)

    df = sub.add_parser("diff", help="what differs between two KHO trees or FDT files",
                        description="The structural difference of two FDTs: nodes, properties "
                        "and reserve-map entries added (+), removed (-) and changed (~), one per "
                        "line. A or B is an FDT file or a kho/out or kho/in directory (its fdt and "
                        "sub_fdts/*). Exit status 0 if equal, 1 if they differ, 2 on trouble.")
    df.add_argument("a", metavar="A", help="an FDT file or a kho/out or kho/in directory")
    df.add_argument("b", metavar="B", help="the same kind of thing to compare with")
    df.add_argument("--ignore-addresses", action="store_true",
                    help="ignore physical addresses (fdt, preserved-data, preserved-memory-map, "
                    "reserve_mem start): two boots then compare equal when only placement moved")
    df.add_argument("--json", action="store_true", help='print {"equal": ..., "changes": [...]}')
    df.set_defaults(func=cmd_diff)

    st = sub.add_parser("status", help="what the emulated kernel is doing",
                        description="Release, previous release, kexec count, command line, "
                        "finalized, preserved bytes and scratch areas of the current boot.")
    st.add_argument("mountpoint", metavar="MOUNTPOINT", help="a khofs mount point")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(func=cmd_status)

    c = sub.add_parser("ctl", help="act as a kernel subsystem: memory, preservation, subtrees, faults",
                       description="Drive the emulated kernel the way a kernel subsystem would: "
                       "allocate and fill simulated memory, preserve it, register sub-FDTs, "
                       "inject failures. Addresses take 0x hex; sizes take K/M/G suffixes. "
                       "Protocol: docs/control-protocol.md.")
    c.add_argument("mountpoint", metavar="MOUNTPOINT", help="a khofs mount point")
    c.add_argument("--json", action="store_true", help="print results as JSON")
    csub = c.add_subparsers(dest="action", metavar="ACTION", required=True)
    mem = csub.add_parser("mem", help="simulated physical memory")
    msub = mem.add_subparsers(dest="mem_action", required=True)
    x = msub.add_parser("alloc", help="allocate SIZE bytes (whole pages); prints the address")
    x.add_argument("size", type=_size, help=SIZE_HELP)
    x = msub.add_parser("free", help="free an allocation")
    x.add_argument("phys", type=_num, help="the address mem alloc printed")
    x = msub.add_parser("write", help="write a file's bytes (or - for stdin) at PHYS")
    x.add_argument("phys", type=_num, help=PHYS_HELP)
    x.add_argument("file", help="a file, or - for standard input")
    x = msub.add_parser("read", help="write SIZE bytes at PHYS to stdout")
    x.add_argument("phys", type=_num, help=PHYS_HELP)
    x.add_argument("size", type=_size, help=SIZE_HELP)
    sb = csub.add_parser("subtree", help="a producer's sub-FDT")
    ssub = sb.add_subparsers(dest="sub_action", required=True)
    x = ssub.add_parser("add", help="register NAME with a .dts or .dtb (or - for stdin)")
    x.add_argument("name", help="the subtree's node name (out/sub_fdts/NAME)")
    x.add_argument("file", help="a .dts or .dtb file, or - for stdin")
    x.add_argument("--no-preserve", action="store_true",
                   help="do not preserve the blob's pages (the classic misuse)")
    x = ssub.add_parser("remove", help="unregister NAME")
    x.add_argument("name", help="a name given to subtree add")
    ssub.add_parser("list", help="registered subtrees")
    for name, hlp in (("preserve", "kho_preserve_pages of [PHYS, PHYS+SIZE)"),
                      ("unpreserve", "kho_unpreserve_pages of [PHYS, PHYS+SIZE)")):
        x = csub.add_parser(name, help=hlp)
        x.add_argument("phys", type=_num, help=PHYS_HELP + ", page aligned")
        x.add_argument("size", type=_size, help=SIZE_HELP + ", whole pages")
    x = csub.add_parser("preserve-folio", help="kho_preserve_folio of an order-ORDER folio")
    x.add_argument("phys", type=_num, help=PHYS_HELP + ", aligned to the folio size")
    x.add_argument("order", type=int, help="folio order: 2**ORDER pages")
    x.add_argument("--count", type=int, default=1, help="COUNT consecutive folios")
    x = csub.add_parser("unpreserve-folio", help="kho_unpreserve_folio")
    x.add_argument("phys", type=_num, help=PHYS_HELP)
    x.add_argument("order", type=int, help="folio order: 2**ORDER pages")
    x = csub.add_parser("fail", help="the next OP (finalize|abort) fails with ERRNO (e.g. ENOMEM)")
    x.add_argument("op", choices=["finalize", "abort"], help="which operation fails")
    x.add_argument("errno", help="errno name (ENOMEM) or number")
    x = csub.add_parser("test-kho", help="load the KHO test module now")
    x.add_argument("--seed", type=int, help="seed for the folio orders and contents")
    csub.add_parser("log", help="the kernel log of this boot")
    c.set_defaults(func=cmd_ctl)
    return p


# Options of the mount(8) helper form that are khofs's own; the rest go to FUSE.
HELPER_KEYS = {"cmdline": "--cmdline", "memory": "--memory", "nodes": "--nodes",
               "boot_reserved": "--boot-reserved", "abi": "--abi", "release": "--release",
               "stat_size": "--stat-size", "state": "--state", "cache": "--cache"}
# Generic mount options mount.fuse passes along; FUSE takes them from the mount flags.
GENERIC_FLAGS = {"rw", "ro", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "async", "sync",
                 "atime", "noatime", "relatime", "norelatime", "strictatime", "diratime",
                 "nodiratime", "defaults", "silent", "loud"}
FUSE_FLAGS = {"allow_other", "allow_root", "auto_unmount", "default_permissions", "debug"}


def split_mount_options(text: str) -> list[str]:
    """Split -o text on commas. mount.fuse splits values that contain commas (e.g. the
    kho_scratch= sizes) and joins them again, so a piece that is neither key=value nor a
    known flag continues the previous option. Double quotes around a value are removed."""
    out: list[str] = []
    for piece in text.split(","):
        key = piece.partition("=")[0]
        known = (not out or piece in GENERIC_FLAGS or piece in FUSE_FLAGS or
                 ("=" in piece and key.replace("_", "").isalnum() and key.isascii()))
        if known:
            out.append(piece)
        else:
            out[-1] += "," + piece
    result = []
    for opt in out:
        key, eq, val = opt.partition("=")
        if eq and len(val) >= 2 and val[0] == val[-1] == '"':
            val = val[1:-1]
        result.append(key + eq + val)
    return result


def helper_argv(argv: list[str]) -> list[str] | None:
    """`khofs SOURCE MOUNTPOINT [-o OPTS]`, as mount.fuse runs it, as a `mount` command."""
    commands = {"mount", "umount", "kexec", "status", "ctl", "dump"}
    if len(argv) < 2 or argv[0] in commands or argv[0].startswith("-"):
        return None
    rest = argv[2:]
    opts = []
    while rest:
        if rest[0] == "-o" and len(rest) > 1:
            opts += split_mount_options(rest[1])
            rest = rest[2:]
        elif rest[0] == "-v":
            rest = rest[1:]
        else:
            return None
    out = ["mount", argv[1]]
    fuse_opts = []
    for opt in opts:
        key, eq, val = opt.partition("=")
        if key in HELPER_KEYS and eq:
            out += [HELPER_KEYS[key], val]
        elif opt in GENERIC_FLAGS or not opt:
            continue
        else:
            fuse_opts.append(opt)
    if fuse_opts:
        out += ["-o", ",".join(fuse_opts)]
    return out


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    argv = helper_argv(argv) or argv
    args = parser.parse_args(argv)
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
