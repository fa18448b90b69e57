"""khofs map: the physical memory layout of a mount or a kho/ tree, as text or a picture."""

from .common import EXIT_FAIL, EXIT_OK, client, err
from .show import _mount_of


def layout_of(path: str):
    """A khofs mount (or its kho/), any kho/ directory, or a snapshot file: completed by the
    daemon if any."""
    import os
    from ..devicetree.dump import MemorySource
    from ..devicetree.memmap import from_tree, kho_dir_of
    from ..devicetree.snapshot import load, read_dir
    if os.path.isfile(path):
        return from_tree(load(path), path)
    kho = kho_dir_of(path)
    tree = read_dir(kho)
    mnt = _mount_of(kho)
    if mnt is None:
        return from_tree(tree, path)
    with client(mnt) as c:
        status = c.status()
        mem = MemorySource(c, status["memory_size"], status["preserve_bits"])
        return from_tree(tree, path, status, c.call("memory_layout"), mem)


def cmd_map(args) -> int:
    """khofs map PATH [--svg FILE] [--png FILE]."""
    from ..client import ControlError
    from ..devicetree.memmap import MapSourceError, render_text
    from ..devicetree.snapshot import SnapshotError
    try:
        lay = layout_of(args.path)
        for path, fmt in ((args.svg, "svg"), (args.png, "png")):
            if path:
                from ..devicetree.memmap_plot import draw
                draw(lay, path, fmt)
    except ControlError as e:
        err(f"{args.path}: {e.strerror}")
        return EXIT_FAIL
    except (MapSourceError, SnapshotError, OSError) as e:
        err(str(e))
        return EXIT_FAIL
    print(render_text(lay))
    return EXIT_OK


def add_map(sub) -> None:
    """The map subcommand."""
    mp = sub.add_parser("map", help="the physical memory layout: text, or a picture",
                        description="RAM, scratch areas by kind, reserve_mem regions, preserved "
                        "ranges merged by order, where each FDT lives, and totals, of a khofs "
                        "mount, a kho/ directory or a snapshot. --svg/--png draw it (needs khofs[plot]).")
    mp.add_argument("path", metavar="PATH", help="a khofs mount point, its kho/ dir, a copy "
                    "of a kho/ tree, or a snapshot file (khofs record)")
    mp.add_argument("--svg", metavar="FILE", help="also draw the layout as SVG into FILE")
    mp.add_argument("--png", metavar="FILE", help="also draw the layout as PNG into FILE")
    mp.set_defaults(func=cmd_map)
