"""khofs umount, list and status: the mounts there are, their daemons, what their kernels do."""

import json
import os
import signal
import time

from .. import runtime
from .common import (EXIT_FAIL, EXIT_OK, EXIT_USAGE, client, err, no_daemon, oops_lines,
                     stop_lock_sleepers)


def cmd_umount(args) -> int:
    """khofs umount MNT (or --all): unmount, stop the daemon, clear what a dead one left."""
    if args.all == (args.mountpoint is not None):
        err("umount takes a MOUNTPOINT or --all, not both"
            if args.all else "umount needs a MOUNTPOINT (or --all for every khofs mount)")
        return EXIT_USAGE
    if not args.all:
        return _umount(args.mountpoint, os.path.realpath(args.mountpoint))
    mnts = {i["mountpoint"] for i in runtime.all_infos()}
    code = EXIT_OK
    for mnt in sorted(mnts):
        if _umount(mnt, mnt) == EXIT_OK:
            print(f"unmounted {mnt}")
        else:
            code = EXIT_FAIL
    return code


def _umount(given: str, mnt: str) -> int:
    info = runtime.read_info(mnt)
    mounted = runtime.find_mount(mnt)
    if not mounted and not info:
        err(f"{given} is not mounted")
        return EXIT_FAIL
    if mounted and not mounted[0].startswith("fuse"):
        err(f"{given} is a {mounted[0]} mount, not khofs")
        return EXIT_FAIL
    if mounted:
        import subprocess       # not at the top: every mount would pay for it
        r = subprocess.run(["fusermount3", "-u", mnt], capture_output=True, text=True)
        if r.returncode != 0 and not stop_lock_sleepers(mnt, info):
            if "not connected" in r.stderr or not (info and runtime.pid_alive(info.get("pid", 0))):
                r = subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True, text=True)
            if r.returncode != 0:
                err(f"cannot unmount {mnt}: {r.stderr.strip()}")
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


def cmd_status(args) -> int:
    """khofs status MNT: what the emulated kernel is doing."""
    from ..client import ControlError
    try:
        c = client(args.mountpoint)
    except ControlError as e:
        err(no_daemon(args.mountpoint, e))
        return EXIT_FAIL
    try:
        with c:
            st = c.status()
    except ControlError as e:
        err(f"{args.mountpoint}: {e.strerror}")
        return EXIT_FAIL
    if args.json:
        print(json.dumps(st, indent=2))
        return EXIT_OK
    abi = f"ABI {st['abi']}" if st["abi"] else "no KHO in this release"
    print(f"release:          {st['release']} ({abi})")
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
    print("".join(line + "\n" for line in oops_lines(st)), end="")
    for n in st["kexec_notes"]:
        print(f"kexec note:       {n}")
    from ..kernel.replay import replay_lines
    for line in replay_lines(st.get("replay")):
        print(f"replay:           {line}")
    return EXIT_OK


def cmd_list(args) -> int:
    """khofs list: every khofs mount with its daemon's pid, ABI, release and kexec count."""
    from ..client import Client, ControlError
    rows = []
    known = {i["mountpoint"]: i for i in runtime.all_infos()}
    for mnt in sorted(known):
        pid = known.get(mnt, {}).get("pid")
        row = {"mountpoint": mnt, "pid": pid, "abi": None, "release": None, "kexec_count": None,
               "state": "running"}
        try:
            with Client(mnt, timeout=10) as c:
                st = c.status()
            row.update(abi=st["abi"], release=st["release"], kexec_count=st["kexec_count"])
        except ControlError:
            row["state"] = "dead (khofs umount clears it)"
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if rows:
        print(f"{'MOUNTPOINT':<28} {'PID':>7} {'ABI':<4} {'RELEASE':<20} {'KEXECS':>6}  STATE")
    for r in rows:
        def show(v):
            return "-" if v is None else str(v)
        print(f"{r['mountpoint']:<28} {show(r['pid']):>7} {show(r['abi']):<4} "
              f"{show(r['release']):<20} {show(r['kexec_count']):>6}  {r['state']}")
    return EXIT_OK


def add_umount(sub) -> None:
    """The umount subcommand."""
    u = sub.add_parser("umount", help="unmount and stop the daemon (also clears a dead mount)",
                       description="Unmount MOUNTPOINT and wait for its daemon to exit. A mount "
                       "whose daemon died (\"Transport endpoint is not connected\") is cleared "
                       "too. Fails if processes still use the mount.")
    u.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?", help="a khofs mount point")
    u.add_argument("--all", action="store_true",
                   help="every khofs mount (the ones `khofs list` shows)")
    u.set_defaults(func=cmd_umount)


def add_list(sub) -> None:
    """The list subcommand."""
    ls = sub.add_parser("list", help="the khofs mounts and their daemons",
                        description="Every khofs mount: mount point, daemon pid, ABI, release, "
                        "kexec count, and whether its daemon still answers.")
    ls.add_argument("--json", action="store_true",
                    help="print a JSON list of {mountpoint, pid, abi, release, kexec_count, "
                    "state}")
    ls.set_defaults(func=cmd_list)


def add_status(sub) -> None:
    """The status subcommand."""
    st = sub.add_parser("status", help="what the emulated kernel is doing",
                        description="Release, previous release, kexec count, command line, "
                        "finalized, preserved bytes and scratch areas of the current boot.")
    st.add_argument("mountpoint", metavar="MOUNTPOINT", help="a khofs mount point")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(func=cmd_status)
