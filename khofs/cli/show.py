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
    from ..devicetree.dump import MemorySource, decode, render
    try:
        targets = _dump_targets(args.path)
    except (OSError, ValueError) as e:
        err(str(e))
        return EXIT_FAIL
    if args.dts:
        return _dump_dts(targets)
    mem = None
    mnt = _mount_of(args.path)
    if mnt is not None and not args.no_memory:
        try:
            c = client(mnt)
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
        err(f"cannot read {e.filename}: {e.strerror}")
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
        err(f"cannot read {e.filename}: {e.strerror}")
        return EXIT_FAIL
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
    d.add_argument("path", metavar="PATH", help="an FDT file, a khofs mount point or its kho/ dir")
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
