"""The physical memory layout of a KHO handover: `khofs map`.

A Layout is collected from a kho/ tree (what debugfs shows: out/scratch_phys and
out/scratch_len or 7.4's bootmem_*, out/fdt, in/fdt, their sub-FDTs) by from_tree,
completed on a khofs mount by the daemon's replies (RAM, reserve_mem regions, the root
FDTs' pages, the incoming map, and simulated memory to walk out/fdt's map), then rendered as
text here or drawn by memmap_plot.py. Every source of a kho/ tree (a mount, a copy, a snapshot) is a KhoTree of
snapshot.py.
"""

import os
import struct
from dataclasses import dataclass, field

from ..kernel.profile import get_profile, profile_for_fdt, scratch_files_in
from .dump import MemorySource, decode
from ..kernel.rootfdt import rebuild
from .snapshot import ROOT_FDT, KhoTree, creation_order

# The bands, top to bottom, and their titles.
KINDS = ("ram", "scratch", "reserve_mem", "preserved", "fdt")
TITLES = {"ram": "RAM", "scratch": "scratch", "reserve_mem": "reserve_mem",
          "preserved": "preserved", "fdt": "FDTs"}


class MapSourceError(Exception):
    """A path that holds no kho/ tree, or one that cannot be read."""


@dataclass
class Region:
    """One region of physical memory in the layout."""
    kind: str           # one of KINDS
    start: int
    size: int
    label: str          # "node 0", "lowmem", "oops", "order 10", "out/fdt", ...
    order: int | None = None
    side: str = ""      # preserved: "out" (this kernel hands over) or "in" (it received)

    @property
    def end(self) -> int:
        """The first address past the region."""
        return self.start + self.size


@dataclass
class Layout:
    """The physical memory layout of one handover, as `khofs map` shows it."""
    source: str
    ram_size: int | None = None
    abi: str | None = None
    regions: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def of(self, kind: str) -> list:
        """The regions of one kind, in address order."""
        return sorted((r for r in self.regions if r.kind == kind),
                      key=lambda r: (r.side, r.start, r.label))

    @property
    def top(self) -> int:
        """The end of the address axis: RAM's size, else the highest address seen."""
        if self.ram_size:
            return self.ram_size
        return max((r.end for r in self.regions), default=0)


def scratch_kind(i: int) -> str:
    """kho_scratch array order: lowmem, global, then one per NUMA node."""
    return ("lowmem", "global")[i] if i < 2 else f"node {i - 2}"


def merge_by_order(ranges, side: str) -> list:
    """[(order, start, size)] -> Regions, adjacent or overlapping ranges of one order merged."""
    out = []
    for order, start, size in sorted(ranges):
        last = out[-1] if out else None
        if last is not None and last.order == order and start <= last.end:
            last.size = max(last.end, start + size) - last.start
        else:
            out.append(Region("preserved", start, size, f"order {order}", order, side))
    return out


def _lines(tree, path: str) -> list:
    data = tree.read(path)
    if data is None:
        raise MapSourceError(f"cannot read {tree.where(path)}: No such file or directory")
    try:
        return [int(x, 16) for x in data.decode().split()]
    except (UnicodeDecodeError, ValueError):
        raise MapSourceError(f"{tree.where(path)}: not one hex address a line") from None


def kho_dir_of(path: str) -> str:
    """The kho/ directory of a mount point or of a kho/ path."""
    kho = os.path.join(path, "kho")
    kho = kho if os.path.isdir(kho) else path
    if not os.path.isdir(os.path.join(kho, "out")):
        raise MapSourceError(f"{path}: no kho/ tree here (not a khofs mount, or KHO is off)")
    return kho


def from_tree(tree: KhoTree, source: str, status: dict | None = None,
              layout: dict | None = None, mem: MemorySource | None = None) -> Layout:
    """The layout a kho/ tree shows, completed by a daemon's status and memory_layout
    replies and its memory when given (any copy or recording of a kho/ tree works without
    them)."""
    lay = Layout(source)
    phys_name, len_name = scratch_files_in(tree.listdir("out"))
    phys = _lines(tree, f"out/{phys_name}")
    lens = _lines(tree, f"out/{len_name}")
    for i, (a, s) in enumerate(zip(phys, lens)):
        lay.regions.append(Region("scratch", a, s, scratch_kind(i)))
    if status is not None:
        lay.ram_size, lay.abi = status["memory_size"], status["abi"]
    elif tree.meta.get("memory"):
        # recorded from a khofs mount: its RAM, split evenly over its nodes as khofs does
        lay.ram_size, lay.abi = tree.meta["memory"], tree.meta.get("abi")
        nodes = tree.meta.get("nodes") or 1
        per = lay.ram_size // nodes
        lay.regions += [Region("ram", n * per, per, f"node {n}") for n in range(nodes)]
    if layout is not None:
        for nid, n in enumerate(layout["nodes"]):
            lay.regions.append(Region("ram", n["start"], n["end"] - n["start"], f"node {nid}"))
        for r in layout["reserve_mem"]:
            lay.regions.append(Region("reserve_mem", r["start"], r["size"], r["name"]))
    for side in ("out", "in"):
        _side(lay, tree, side, (layout or {}).get(f"{'in_' if side == 'in' else ''}fdt_phys"),
              mem if side == "out" else None)
    if layout is None:
        unknown = ["the root FDTs' addresses"]
        if not any(r.kind == "reserve_mem" for r in lay.regions):
            unknown.append("reserve_mem regions (none in a memblock sub-FDT)")
        if not lay.ram_size:
            unknown.append("RAM's size")
        lay.notes.append(f"not shown, as a kho/ tree does not hold them: {', '.join(unknown)}; "
                         "a khofs mount's daemon tells them (khofs map MOUNTPOINT)")
    if layout is not None and layout["incoming"]:
        lay.regions += merge_by_order([(r["order"], r["start"], r["size"])
                                       for r in layout["incoming"]], "in")
    _notes(lay, tree, status, mem)
    if lay.ram_size is None and lay.regions:
        lay.regions.append(Region("ram", 0, lay.top, "RAM (extent unknown)"))
    return lay


def _side(lay: Layout, tree: KhoTree, side: str, root_phys, mem) -> None:
    path = f"{side}/fdt"
    whole = tree.extra.get(ROOT_FDT) if side == "out" else None
    if whole is not None:
        blob = whole
        lay.notes.append("out/fdt: the whole root FDT the recording kept beside the shorter "
                         "debugfs file")
    elif tree.read(path) is not None:
        blob = tree.read(path)
    elif side == "out" and None not in (root_phys, mem, lay.abi) and \
            get_profile(lay.abi).fdt_at_boot:
        # 7.x keeps the root FDT current in its page, but debugfs shows it only after a
        # cold boot.
        blob = mem.read(root_phys, min(struct.unpack(">I", mem.read(root_phys + 4, 4))[0],
                                       1 << 20))
        lay.notes.append(f"out/fdt is not in debugfs after a kexec (ABI {lay.abi}); read "
                         "from the root FDT's page")
    else:
        return
    size = struct.unpack(">I", blob[4:8])[0] if len(blob) >= 8 else 0
    if len(blob) < size and root_phys is not None and mem is not None:
        # 7.x: out/fdt keeps the size the FDT had when the file was made; the FDT grows.
        lay.notes.append(f"{side}/fdt shows {len(blob)} of the FDT's {size} bytes (its size "
                         "was fixed when the file was made); the rest read from memory")
        blob = mem.read(root_phys, size)
    sub_dir = f"{side}/sub_fdts"
    subs = {n: tree.read(f"{sub_dir}/{n}") for n in tree.listdir(sub_dir)
            if tree.read(f"{sub_dir}/{n}") is not None}
    unseen = []
    if len(blob) < size:
        # A copy of a 7.x tree: the rest of the root FDT rebuilt the kernel's way, as
        # khofs record does; where the children past the shown bytes live stays unknown.
        shown = len(blob)
        try:
            prof = get_profile(lay.abi) if lay.abi else \
                profile_for_fdt(blob, True, tree.listdir("out"))
            if prof is None:
                raise ValueError("its compatible is no known release's")
            blob, unseen = rebuild(blob, subs, prof, creation_order(tree))
            where = (f", but where {', '.join(unseen)} "
                     f"{'lives' if len(unseen) == 1 else 'live'} is not shown") if unseen else ""
            lay.notes.append(f"{side}/fdt shows {shown} of the FDT's {size} bytes (its size "
                             f"was fixed when the file was made); the rest rebuilt the "
                             f"kernel's way{where}")
        except ValueError as e:
            raise MapSourceError(f"{tree.where(path)}: truncated FDT ({shown} of the {size} "
                                 "bytes its header says), and khofs cannot rebuild the rest "
                                 f"the kernel's way: {e}") from None
    d = decode(blob, tree.where(path), mem, subs)
    if d["root"] is None:
        raise MapSourceError(f"{tree.where(path)}: {'; '.join(d['problems'])}")
    if root_phys is not None:
        lay.regions.append(Region("fdt", root_phys, len(blob), f"{side}/fdt"))
    for child in d["root"]["children"]:
        props = {p["name"]: p for p in child["properties"]}
        where = props.get("fdt") or props.get("preserved-data")
        if where is None or where["kind"] != "u64":
            continue
        if child["name"] not in unseen:         # where an unseen one lives is not known
            size = len(subs[child["name"]]) if child["name"] in subs else \
                (props["blob-size"]["value"] if "blob-size" in props else 0)
            label = f"{side}/sub_fdts/{child['name']}"
            lay.regions.append(Region("fdt", where["value"], size, label))
        sub = child.get("sub_fdt") or {}
        if sub.get("compatible") == "memblock-v1":
            known = {(r.label, r.start) for r in lay.regions if r.kind == "reserve_mem"}
            for region in sub["root"]["children"]:
                rp = {p["name"]: p["value"] for p in region["properties"]}
                if "start" in rp and "size" in rp and (region["name"], rp["start"]) not in known:
                    lay.regions.append(Region("reserve_mem", rp["start"], rp["size"],
                                              region["name"]))
    m = d["memory_map"]
    if m is not None:
        if m["error"]:
            lay.notes.append(f"{side}/fdt's memory map: {m['error']}")
        lay.regions += merge_by_order([(r["order"], r["start"], r["size"]) for r in m["ranges"]],
                                      side)


def _notes(lay: Layout, tree: KhoTree, status, mem) -> None:
    out_map = sum(r.size for r in lay.regions if r.kind == "preserved" and r.side == "out")
    if status is not None and status["preserved_bytes"] != out_map:
        shown = "no out/fdt" if tree.read("out/fdt") is None else \
            f"out/fdt's map holds {fmt_size(out_map)}"
        why = " (the map is written at finalize: echo 1 > kho/out/finalize)" \
            if tree.read("out/finalize") is not None else ""
        lay.notes.append(f"this kernel preserves {fmt_size(status['preserved_bytes'])}; "
                         f"{shown}{why}")
    if mem is None and tree.read("out/fdt") is not None:
        lay.notes.append("preserved ranges not shown: out/fdt's memory map lives in preserved "
                         "memory, which a copy or a snapshot does not hold")


# -- text -------------------------------------------------------------------------------
def fmt_size(n: int) -> str:
    """A size in the largest unit that shows it plainly (4 KiB, 1.5 GiB)."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and (n % (1 << shift) == 0 or shift >= 20):
            q = n / (1 << shift)
            return f"{n >> shift} {unit}" if n % (1 << shift) == 0 else f"{q:.2f} {unit}"
    return f"{n} bytes"


def _total(n: int) -> str:
    text = fmt_size(n)
    return text if text.endswith("bytes") else f"{text} ({n} bytes)"


def _row(r: Region, width: int) -> str:
    extra = ""
    if r.kind == "preserved":
        extra = f"  {r.size >> (12 + r.order)} block(s)"
    return (f"  {r.label:<{width}} [0x{r.start:0{12}x}, 0x{r.end:0{12}x})  "
            f"{fmt_size(r.size):>10}{extra}")


def render_text(lay: Layout) -> str:
    """The text form of a layout."""
    ram = fmt_size(lay.ram_size) if lay.ram_size else "unknown"
    lines = [f"{lay.source}: physical memory layout"
             + (f" (ABI {lay.abi})" if lay.abi else "") + f", RAM {ram}"]
    width = max([len(r.label) for r in lay.regions] + [8])
    for kind in KINDS:
        groups = [("", lay.of(kind))]
        if kind == "preserved":
            groups = [(f" ({s}: {'handed over by this kernel' if s == 'out' else 'received'}"
                       ", merged by order)",
                       sorted((r for r in lay.of(kind) if r.side == s),
                              key=lambda r: (r.order, r.start)))
                      for s in ("out", "in")]
        for suffix, regions in groups:
            if not regions and kind == "preserved":
                continue
            lines.append(f"{TITLES[kind]}{suffix}:")
            lines += [_row(r, width) for r in regions] or ["  (none)"]
    lines.append("totals:")
    for kind in KINDS:
        regions = lay.of(kind)
        if kind == "preserved":
            for side in ("out", "in"):
                rs = [r for r in regions if r.side == side]
                if rs:
                    orders = {}
                    for r in rs:
                        orders[r.order] = orders.get(r.order, 0) + r.size
                    per = ", ".join(f"order {o}: {fmt_size(n)}" for o, n in sorted(orders.items()))
                    total = sum(r.size for r in rs)
                    lines.append(f"  {f'preserved ({side}):':<17} {_total(total)} in "
                                 f"{len(rs)} range(s); {per}")
            continue
        total = sum(r.size for r in regions)
        lines.append(f"  {TITLES[kind] + ':':<17} {_total(total)} in "
                     f"{len(regions)} {'region' if kind != 'fdt' else 'FDT'}(s)")
    lines += [f"note: {n}" for n in lay.notes]
    return "\n".join(lines)

