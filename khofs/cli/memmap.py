"""khofs map: the physical memory layout of a mount or a kho/ tree, as text or a picture."""

from .common import EXIT_FAIL, EXIT_OK, client, err
from .show import _mount_of


def layout_of(path: str):
    """A khofs mount (or its kho/), or any kho/ directory: completed by the daemon if any."""
    from ..devicetree.dump import MemorySource
    from ..devicetree.memmap import from_kho_dir, kho_dir_of
    kho = kho_dir_of(path)
    mnt = _mount_of(kho)
    if mnt is None:
        lay = from_kho_dir(kho)
    else:
        with client(mnt) as c:
            status = c.status()
            mem = MemorySource(c, status["memory_size"], status["preserve_bits"])
            lay = from_kho_dir(kho, status, c.call("memory_layout"), mem)
    lay.source = path
    return lay


def cmd_map(args) -> int:
    """khofs map PATH [--svg FILE] [--png FILE]."""
    from ..client import ControlError
    from ..devicetree.memmap import MapSourceError, render_text
    try:
        lay = layout_of(args.path)
        for path, fmt in ((args.svg, "svg"), (args.png, "png")):
            if path:
                from ..devicetree.memmap_plot import draw
                draw(lay, path, fmt)
    except ControlError as e:
        err(f"{args.path}: {e.strerror}")
        return EXIT_FAIL
    except (MapSourceError, OSError) as e:
        err(str(e))
        return EXIT_FAIL
    print(render_text(lay))
    return EXIT_OK


def add_map(sub) -> None:
    """The map subcommand."""
    mp = sub.add_parser("map", help="the physical memory layout: text, or a picture",
                        description="RAM, scratch areas by kind, reserve_mem regions, preserved "
                        "ranges merged by order, where each FDT lives, and totals, of a khofs "
                        "mount or a kho/ directory. --svg/--png draw it (needs khofs[plot]).")
    mp.add_argument("path", metavar="PATH", help="a khofs mount point, its kho/ dir, or a copy "
                    "of a kho/ tree")
    mp.add_argument("--svg", metavar="FILE", help="also draw the layout as SVG into FILE")
    mp.add_argument("--png", metavar="FILE", help="also draw the layout as PNG into FILE")
    mp.set_defaults(func=cmd_map)
