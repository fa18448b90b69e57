"""khofs dump and diff: read KHO trees and blobs, from a mount or from files."""

import json
import os

from .. import runtime
from .common import EXIT_FAIL, EXIT_OK, client, err


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
    if os.path.isdir(path) and os.path.basename(os.path.normpath(path)) in ("out", "in") and \
            not os.path.isdir(os.path.join(path, "out")):
        # kho/out or kho/in itself, as diff takes it
        sub = os.path.join(path, "sub_fdts")
        return [(os.path.join(path, "fdt"), sub if os.path.isdir(sub) else None)]
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
    """khofs dump PATH: KHO FDTs decoded and checked, as text, JSON or DTS."""
    from ..devicetree.dump import render
    if args.dts:
        return _dump_dts(args.path)
    if args.path == "-":
        import sys
        targets, stdin = [("-", None)], sys.stdin.buffer.read()
    else:
        stdin = None
        try:
            targets = _dump_targets(args.path)
        except (OSError, ValueError) as e:
            err(str(e))
            return EXIT_FAIL
    daemon = None
    mnt = None if args.path == "-" else _mount_of(args.path)
    if mnt is not None and not args.no_memory:
        daemon = _daemon_of(mnt)
    results = []
    try:
        for fdt_path, sub_dir in targets:
            results.append(_dump_one(fdt_path, sub_dir, daemon, stdin, args.no_memory))
    except OSError as e:
        err(f"cannot read {e.filename}: {e.strerror}")
        return EXIT_FAIL
    finally:
        if daemon is not None:
            daemon[0].close()
    if args.json:
        print(json.dumps(results if len(results) != 1 else results[0], indent=2))
    else:
        if not results:
            print(f"{args.path}: not finalized and no handover: no KHO FDT to show")
        print("\n\n".join(render(r) for r in results))
    return EXIT_FAIL if any(r["problems"] for r in results) else EXIT_OK


def _daemon_of(mnt):
    """(client, status, memory_layout, MemorySource) of the daemon serving mnt, or None."""
    from ..client import ControlError
    from ..devicetree.dump import MemorySource
    try:
        c = client(mnt)
    except ControlError:
        return None
    try:
        st = c.status()
        return c, st, c.memory_layout(), MemorySource(c, st["memory_size"], st["preserve_bits"])
    except ControlError:
        c.close()
        return None


def _made(sub_dir):
    """name -> creation time of each sub_fdts file, when they all tell one apart (the order
    a 7.x kernel added them in, which a rebuild of a short out/fdt needs)."""
    made = {n: os.stat(os.path.join(sub_dir, n)).st_mtime_ns for n in os.listdir(sub_dir)}
    return made if len(set(made.values())) == len(made) else None


def _dump_one(fdt_path, sub_dir, daemon, stdin, no_memory) -> dict:
    from ..devicetree.dump import decode
    from ..devicetree.whole import complete_root_fdt
    if stdin is not None:
        blob = stdin
    else:
        with open(fdt_path, "rb") as f:
            blob = f.read()
    subs = {}
    if sub_dir:
        for name in sorted(os.listdir(sub_dir)):
            with open(os.path.join(sub_dir, name), "rb") as f:
                subs[name] = f.read()
    side = os.path.basename(os.path.dirname(fdt_path)) if sub_dir is not None or \
        os.path.basename(fdt_path) == "fdt" else None
    abi = daemon[1]["abi"] if daemon else None
    mem = daemon[3] if daemon else None
    notes, kw = [], {}
    if side == "out" and len(blob) >= 8 and int.from_bytes(blob[4:8], "big") > len(blob) and \
            blob[:4] == b"\xd0\x0d\xfe\xed":
        root_phys = daemon[2]["fdt_phys"] if daemon else None
        try:
            blob, note, _ = complete_root_fdt(blob, subs, abi, root_phys, mem,
                                              _made(sub_dir) if sub_dir else None)
            notes.append(note)
        except ValueError as e:
            notes.append(f"out/fdt is cut short and khofs cannot rebuild the rest the "
                         f"kernel's way: {e}")
    if side == "in" and daemon:
        # The old kernel's map pages are free memory in the new one by now: what the
        # kernel received is the daemon's to tell, not memory's.
        runs = sorted(daemon[2]["incoming"], key=lambda r: (r["order"], r["start"]))
        kw["memory_map"] = {"format": None, "source": "daemon", "chunks": None, "ranges": runs,
                            "total_bytes": sum(r["size"] for r in runs), "error": None}
        mem = None
    elif no_memory:
        kw["map_unread"] = "--no-memory"
    elif side == "in":
        kw["map_unread"] = ("in/fdt's map points into the old kernel's memory, which the next "
                            "kernel reuses; only the mount's daemon tells what it received "
                            "(khofs dump on the mount, khofs map)")
    elif mem is None:
        kw["map_unread"] = ("it lives in preserved memory, which a file or a copy does not "
                            "hold (khofs dump on a khofs mount reads it)")
    d = decode(blob, "stdin" if stdin is not None else fdt_path, mem, subs, abi=abi, **kw)
    d["notes"] = notes + d["notes"]
    return d


def _dump_dts(path: str) -> int:
    """Each blob of path (a file, - for stdin, a mount, a kho/ or kho/out|in directory) as
    device-tree source; a blob that is not an FDT is named with its size."""
    import sys
    from ..devicetree.diff import DiffError, dts_text
    if path == "-":
        blobs = [("stdin", sys.stdin.buffer.read())]
    else:
        try:
            paths = []
            for fdt_path, sub_dir in _dump_targets(path):
                paths += [fdt_path] if os.path.exists(fdt_path) else []
                if sub_dir and os.path.isdir(sub_dir):
                    paths += [os.path.join(sub_dir, n) for n in sorted(os.listdir(sub_dir))]
            blobs = []
            for p in paths:
                with open(p, "rb") as f:
                    blobs.append((p, f.read()))
        except OSError as e:
            err(f"cannot read {e.filename}: {e.strerror}" if e.filename else str(e))
            return EXIT_FAIL
        except ValueError as e:
            err(str(e))
            return EXIT_FAIL
    out = []
    try:
        for where, blob in blobs:
            if blob[:4] != b"\xd0\x0d\xfe\xed":
                out.append(f"// {where}: {len(blob)} bytes, not an FDT\n")
                continue
            head = [f"// {where}"] if len(blobs) > 1 else []
            out.append("\n".join(head + [dts_text(blob, where)]))
    except DiffError as e:
        err(str(e))
        return EXIT_FAIL
    print("\n".join(out), end="")
    return EXIT_OK


# -- diff ------------------------------------------------------------------------------
def cmd_diff(args) -> int:
    """khofs diff A B: the changes from A to B; exit 0 equal, 1 different, 2 trouble."""
    from ..devicetree.diff import DiffError, diff_paths, render
    try:
        changes = diff_paths(args.a, args.b, args.ignore_addresses)
    except DiffError as e:
        err(str(e))
        return 2        # as diff(1): trouble
    if args.json:
        print(json.dumps({"equal": not changes, "changes": changes}, indent=2))
    else:
        for line in render(changes):
            print(line)
    return 1 if changes else EXIT_OK


def add_dump(sub) -> None:
    """The dump subcommand."""
    d = sub.add_parser("dump", help="decode and check KHO FDTs (a file, or a mounted tree)",
                       description="Decode out/fdt, in/fdt or any KHO FDT file: u64 properties "
                       "as addresses, sub-FDTs inline, and (on a khofs mount) the preserved-memory "
                       "map walked. Checks the KHO bindings; exit status 1 if anything is wrong.")
    d.add_argument("path", metavar="PATH", help="an FDT file (- for stdin), a khofs mount point, "
                   "its kho/ dir, or a kho/out or kho/in directory")
    fmt = d.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true",
                     help="print JSON (schema: see khofs/devicetree/dump.py)")
    fmt.add_argument("--dts", action="store_true",
                     help="print plain device-tree source of each blob instead (no dtc needed)")
    d.add_argument("--no-memory", action="store_true",
                   help="do not read simulated memory through the control socket")
    d.set_defaults(func=cmd_dump)


def add_diff(sub) -> None:
    """The diff subcommand."""
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
