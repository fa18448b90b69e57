"""Draw a memmap.Layout with matplotlib (the optional `khofs[plot]` extra).

Two panels share the bands (one per kind, preserved memory one per side). The upper one is
the address axis to scale, every region at least a sliver wide so that a 4 KiB FDT page
still shows in 1 TiB of RAM. The lower one cuts the axis at every region's start and end
and gives each stretch a width that grows with the logarithm of its length, so that a
page, a 16 MiB scratch area and a terabyte of RAM between them are all readable at once;
its ticks are the real addresses and the RAM band says how long each stretch is.
"""

import math

from .memmap import KINDS, TITLES, Layout, MapSourceError, fmt_size

INSTALL_HINT = "pip install 'khofs[plot]' (or run scripts/setup.sh)"
COLORS = {"ram": "#d9d9d9", "scratch": "#4c9be8", "reserve_mem": "#e8924c", "fdt": "#d64545"}
AXIS_PT = 13 * 72 * 0.77  # the panels' width in points, to tell whether a label fits
MIN_SLIVER = 0.004        # of the axis: the narrowest a region is drawn in the upper panel


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MapSourceError(f"--svg/--png need matplotlib, which is not installed: "
                             f"{INSTALL_HINT}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return matplotlib, plt


def bands(lay: Layout) -> list:
    """[(title, regions)] top to bottom: every kind, preserved once per side present."""
    out = []
    for kind in KINDS:
        regions = lay.of(kind)
        if kind == "preserved":
            sides = [s for s in ("out", "in") if any(r.side == s for r in regions)]
            for s in sides:
                out.append((f"preserved ({s})", [r for r in regions if r.side == s]))
            if not sides:
                out.append(("preserved", []))
            continue
        out.append((TITLES[kind], regions))
    return out


class Warp:
    """Piecewise-linear address -> x: each stretch between boundaries 1 + log2(pages) wide."""

    def __init__(self, lay: Layout):
        pts = {0, lay.top}
        for r in lay.regions:
            pts.update((r.start, r.end))
        self.addr = sorted(pts)
        self.x = [0.0]
        for a, b in zip(self.addr, self.addr[1:]):
            self.x.append(self.x[-1] + 1 + math.log2(max(b - a, 4096) / 4096))

    def __call__(self, a: int) -> float:
        import bisect
        i = min(max(bisect.bisect_right(self.addr, a) - 1, 0), len(self.addr) - 2)
        a0, a1 = self.addr[i], self.addr[i + 1]
        return self.x[i] + (self.x[i + 1] - self.x[i]) * (a - a0) / ((a1 - a0) or 1)


def _color(r, orders, cmap):
    if r.kind != "preserved":
        return COLORS[r.kind]
    return cmap(orders.index(r.order) / max(len(orders) - 1, 1) * 0.85)


def draw(lay: Layout, path: str, fmt: str) -> None:
    """Draw the layout to path as SVG or PNG (fmt), with matplotlib."""
    matplotlib, plt = _pyplot()
    matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "khofs",
                                "font.size": 8})
    rows = bands(lay)
    orders = sorted({r.order for r in lay.regions if r.kind == "preserved"})
    cmap = matplotlib.colormaps["viridis"]
    top = lay.top or 1
    fig, (lin, warp_ax) = plt.subplots(
        2, 1, figsize=(13, 1.6 + 1.05 * len(rows)),
        gridspec_kw={"height_ratios": [1, 1.4], "hspace": 0.4})
    warp = Warp(lay)
    n = len(rows)
    for ax in (lin, warp_ax):
        ax.set_ylim(-0.6, n - 0.4)
        ax.set_yticks(range(n), [t for t, _ in rows])
        ax.invert_yaxis()
        ax.tick_params(axis="y", length=0)
        for s in ("top", "right", "left"):
            ax.spines[s].set_visible(False)
    keyed = []
    for y, (title, regions) in enumerate(rows):
        lin_bars, warp_bars, colors = [], [], []
        for r in regions:
            w = max(r.size / top, MIN_SLIVER)
            lin_bars.append((r.start / top, w))
            x0, x1 = warp(r.start), warp(r.end)
            warp_bars.append((x0, max(x1 - x0, 0.15)))
            colors.append(_color(r, orders, cmap))
        gid = "band-" + title.replace(" ", "-").replace("(", "").replace(")", "")
        for ax, bars in ((lin, lin_bars), (warp_ax, warp_bars)):
            coll = ax.broken_barh(bars, (y - 0.34, 0.68), facecolors=colors or None,
                                  edgecolor="#333333", linewidth=0.4)
            coll.set_gid(gid)
        for i, (r, (x0, w)) in enumerate(zip(regions, warp_bars)):
            if r.kind == "ram":
                lin.text(r.start / top + r.size / top / 2, y, r.label, ha="center",
                         va="center", fontsize=7)
                continue
            if r.kind == "preserved":
                continue            # the legend names the orders
            fits = len(r.label) * 7 * 0.62 <= w / warp.x[-1] * AXIS_PT
            text = r.label
            if not fits:
                # A label wider than its bar: a number just above or below it, alternately,
                # and the label in the key.
                keyed.append(r.label)
                text = str(len(keyed))
            dy, va = (0, "center") if fits else ((-0.36, "bottom"), (0.36, "top"))[i % 2]
            warp_ax.text(x0 + w / 2, y + dy, text, ha="center", va=va, fontsize=7)
    _gaps(lay, warp, warp_ax, rows)
    lin.set_xlim(0, 1 + MIN_SLIVER)
    ticks = [i / 4 for i in range(5)]
    lin.set_xticks(ticks, [fmt_size(int(t * top)) if t else "0" for t in ticks])
    lin.set_title(f"{lay.source}: physical memory, to scale ({fmt_size(top)}; small regions "
                  "widened to stay visible)", loc="left", fontsize=9)
    warp_ax.set_xlim(0, warp.x[-1])
    _warp_ticks(warp, warp_ax)
    warp_ax.set_title("the same, each stretch between region edges as wide as log2 of its "
                      "length (ticks: real addresses)", loc="left", fontsize=9)
    for ax in (lin, warp_ax):
        ax.grid(axis="x", color="#eeeeee", linewidth=0.6)
        ax.set_axisbelow(True)
    if orders:
        from matplotlib.patches import Patch
        handles = [Patch(facecolor=cmap(orders.index(o) / max(len(orders) - 1, 1) * 0.85),
                         label=f"order {o} ({fmt_size(4096 << o)} blocks)") for o in orders]
        warp_ax.add_artist(warp_ax.legend(
            handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7,
            title="preserved", title_fontsize=7, frameon=False))
    if keyed:
        from matplotlib.patches import Patch
        handles = [Patch(visible=False, label=f"{n}: {label}")
                   for n, label in enumerate(keyed, 1)]
        warp_ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(1.0, 0.0),
                       fontsize=7, handlelength=0, handletextpad=0, frameon=False)
    try:
        fig.savefig(path, format=fmt, bbox_inches="tight", dpi=110,
                    metadata={"Date": None} if fmt == "svg" else None)
    except OSError as e:
        raise MapSourceError(f"cannot write {path}: {e.strerror}") from None
    finally:
        plt.close(fig)


def _gaps(lay, warp, ax, rows) -> None:
    """The RAM band: how long each stretch is that no other region starts or ends in."""
    y = next(i for i, (t, _) in enumerate(rows) if t == TITLES["ram"])
    for a, b, x0, x1 in zip(warp.addr, warp.addr[1:], warp.x, warp.x[1:]):
        if x1 - x0 >= 0.055 * warp.x[-1]:
            ax.text((x0 + x1) / 2, y, fmt_size(b - a), ha="center", va="center", fontsize=6.5,
                    color="#555555")


def _warp_ticks(warp, ax) -> None:
    ticks, last = [], -1e9
    for a, x in zip(warp.addr, warp.x):
        if x - last >= 0.025 * warp.x[-1]:
            ticks.append((x, f"0x{a:x}"))
            last = x
    ax.set_xticks([x for x, _ in ticks], [t for _, t in ticks], rotation=90, fontsize=6.5)
