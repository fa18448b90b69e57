"""khofs record: keep a kho/ debugfs tree (a real kernel's, a copy, a khofs mount's) in a file."""

import base64
import os
import time

from ..kernel.profile import PROFILES
from .common import EXIT_FAIL, EXIT_OK, EXIT_USAGE, client, err, kernels_differ, release_arg
from .show import _mount_of

SYSTEM_KHO = "/sys/kernel/debug/kho"


def _source(kho: str, tree) -> None:
    """What the tree's source can tell beyond debugfs: release, cmdline, ABI, whole root FDT."""
    from ..devicetree.snapshot import ROOT_FDT
    from ..kernel.fdt import totalsize
    from .. import runtime
    # A khofs mount directly, or under a bind (a namespace whose /sys/kernel/debug is one):
    # its daemon, not this host's uname, knows the kernel.
    mnt = _mount_of(kho) or runtime.khofs_mount_of(kho)
    if mnt is not None:
        with client(mnt) as c:
            st = c.status()
            tree.meta.update(source={"kind": "khofs", "path": kho}, release=st["release"],
                             cmdline=st["cmdline"], abi=st["abi"], memory=st["memory_size"],
                             nodes=st["nodes"])
            fdt = tree.read("out/fdt")
            # 7.x sizes out/fdt once, when it makes the file, and shows none after a kexec;
            # the FDT itself lives on in its page.
            if fdt is None or len(fdt) < 8 or totalsize(fdt) > len(fdt):
                whole = c.call("root_fdt")["fdt"]
                if whole is not None:
                    tree.extra[ROOT_FDT] = base64.b64decode(whole)
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
    from ..devicetree.snapshot import SnapshotError, not_from, read_dir, recording, save
    why = kernels_differ(args.abi, args.release)
    if why:
        err(why)
        return EXIT_USAGE
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
        if tree.meta["source"]["kind"] == "running system" and args.release is None \
                and args.abi is None:
            why = not_from(tree, tree.meta["release"])
            if why:
                err(f"{src} is not the running kernel's (uname -r {tree.meta['release']}): "
                    f"{why}; say whose it is with --release R and --abi P")
                return EXIT_FAIL
        for key in ("abi", "release", "cmdline"):
            if getattr(args, key) is not None:
                tree.meta[key] = getattr(args, key)
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
          f"{len(rec.plan.kids)} sub-blob(s)) in {args.snapshot}")
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
    r.add_argument("--abi", choices=list(PROFILES),
                   help="the recorded kernel's ABI profile, where the tree cannot tell (a copy: "
                   "by default its release's, else 7.1 for kho-v3, 7.4 for kho-v4 beside "
                   "bootmem_* files and 7.2 beside scratch_*, 7.0 for a short kho-v1 out/fdt, "
                   "6.18 otherwise)")
    r.add_argument("--release", type=release_arg, metavar="R",
                   help="the recorded kernel's uname -r (a copy has none)")
    r.add_argument("--cmdline", help="the recorded kernel's command line (a copy has none; "
                   "replay boots with it unless given one)")
    r.set_defaults(func=cmd_record)
