"""khofs record: keep a kho/ debugfs tree (a real kernel's, a copy, a khofs mount's) in a file."""

import os
import time

from .common import EXIT_FAIL, EXIT_OK, client, err
from .show import _mount_of

SYSTEM_KHO = "/sys/kernel/debug/kho"


def _source(kho: str, tree) -> None:
    """What the tree's source can tell beyond debugfs: release, cmdline, ABI, whole root FDT."""
    from ..devicetree.snapshot import ROOT_FDT
    from ..kernel.fdt import totalsize
    from ..kernel.replay import fdt_problem
    mnt = _mount_of(kho)
    if mnt is not None:
        with client(mnt) as c:
            st = c.status()
            tree.meta.update(source={"kind": "khofs", "path": kho}, release=st["release"],
                             cmdline=st["cmdline"], abi=st["abi"], memory=st["memory_size"],
                             nodes=st["nodes"])
            fdt = tree.read("out/fdt")
            if fdt is not None and fdt_problem(fdt) and len(fdt) >= 8 and \
                    totalsize(fdt) > len(fdt):
                # 7.x fixes out/fdt's size when it makes the file; the FDT grows in its page.
                phys = c.call("memory_layout")["fdt_phys"]
                tree.extra[ROOT_FDT] = c.mem_read(phys, totalsize(fdt))
        return
    if os.path.realpath(kho) == os.path.realpath(SYSTEM_KHO):
        with open("/proc/cmdline", "rb") as f:
            cmdline = f.read().decode(errors="replace").strip()
        tree.meta.update(source={"kind": "running system", "path": kho},
                         release=os.uname().release, cmdline=cmdline)
        return
    tree.meta.update(source={"kind": "directory", "path": kho})


def cmd_record(args) -> int:
    """khofs record SNAPSHOT [--from DIR]."""
    from ..client import ControlError
    from ..devicetree.snapshot import SnapshotError, read_dir, recording, save
    src = args.source
    kho = os.path.join(src, "kho") if os.path.isdir(os.path.join(src, "kho")) else src
    if not os.path.isdir(os.path.join(kho, "out")):
        why = " (is debugfs mounted, and the kernel built with KHO and booted with kho=on?)" \
            if src == SYSTEM_KHO else ""
        err(f"{src}: no kho/ debugfs tree here (no out/ directory){why}")
        return EXIT_FAIL
    try:
        tree = read_dir(kho)
        _source(os.path.abspath(kho), tree)
        tree.meta["recorded"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        rec = recording(tree, args.snapshot)
        save(tree, args.snapshot)
    except ControlError as e:
        err(f"{src}: {e.strerror}")
        return EXIT_FAIL
    except (SnapshotError, OSError) as e:
        err(str(e))
        return EXIT_FAIL
    what = f"release {rec.release}, " if rec.release else ""
    print(f"recorded {len(tree.files)} files of {kho} ({what}ABI {rec.abi}, "
          f"{len(rec.blobs)} sub-blob(s)) in {args.snapshot}")
    return EXIT_OK


def add_record(sub) -> None:
    """The record subcommand."""
    r = sub.add_parser("record", help="keep a kho/ debugfs tree in a snapshot file",
                       description="Read a kho/ debugfs tree (the running kernel's by default, a "
                       "copy of one, or a khofs mount's) and write every file, byte for byte, "
                       "with its mode, into SNAPSHOT (docs/snapshot-format.md). The tree must "
                       "hand something over: out/fdt must be there (finalize first on "
                       "6.16/6.18). khofs mount --replay SNAPSHOT boots its successor.")
    r.add_argument("snapshot", metavar="SNAPSHOT", help="the file to write")
    r.add_argument("--from", dest="source", default=SYSTEM_KHO, metavar="DIR",
                   help=f"the kho/ directory (default {SYSTEM_KHO}), or a khofs mount point")
    r.set_defaults(func=cmd_record)
