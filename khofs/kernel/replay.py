"""A recorded kernel's handover made into what its successor receives (khofs mount --replay).

debugfs shows the root FDT, the sub-blobs and the scratch areas, but not where the root FDT
lives, what preserved memory holds, nor the memory map's chunks (or radix tree). So the
successor gets the recorded blobs at their recorded addresses, the root FDT at the lowest free page,
the recorded scratch areas, and a memory map written at the recorded `preserved-memory-map`
address, in the recorded kernel's format, that preserves only what the recording shows:
the root FDT page, the sub-blobs and the reserve_mem regions named in the memblock FDT.
Everything else the recorded kernel preserved reads as zeros.
"""

import errno
from dataclasses import asdict, dataclass, field
from functools import cached_property

import libfdt

from .errors import KernelError
from .fdt import check_header, getprop, node_check_compatible, prop_value_offset, subnodes, \
    totalsize
from .handover import Handover
from .kexec import place_segment
from .kho_fdt import (KEXEC_METADATA, KHO_KEXEC_METADATA_VERSION, KHO_METADATA_NODE_NAME,
                      PROP_BLOB_SIZE, PROP_PRESERVED_MEMORY_MAP, PROP_SUB_FDT)
from .memtrack import MemTracker
from .physmem import (PAGE_SHIFT, PAGE_SIZE, SZ_1M, Kmalloc, Memblock, PageAllocator, PhysMem,
                      RangeSet)
from .producers.memblock import MEMBLOCK_KHO_FDT, MEMBLOCK_KHO_NODE_COMPATIBLE
from .profile import get_profile, kernel_name
from .radix import RadixTracker
from .scratch import encode_scratch

PROP_PRESERVED_DATA = "preserved-data"
MAX_PHYS = 1 << 52               # x86-64 MAX_PHYSMEM_BITS (5-level paging)


class RecordingError(ValueError):
    """A recorded tree that no kernel could have handed over: path (relative to kho/, or "")
    names the file, rest says what is wrong with it."""

    def __init__(self, path: str, rest: str):
        super().__init__(path + rest)
        self.path, self.rest = path, rest


@dataclass
class Child:
    """One root FDT child: where its blob lives (None: not recorded) and its bytes."""
    name: str
    phys: int | None
    data: bytes


@dataclass
class Plan:
    """Where a recording's pieces go in the successor's memory."""
    kids: list                       # Child per handed-over sub-blob
    map_phys: int | None             # the recorded preserved-memory-map address
    regions: list                    # (name, start, size) of memblock's reserve_mem regions
    extent: int                      # the first address past all of it


@dataclass
class Recording:
    """A recorded kho/ tree's outgoing side, as khofs record kept it."""
    fdt: bytes                       # the root FDT, whole
    blobs: dict                      # name -> bytes of out/sub_fdts/NAME
    scratch: list                    # [(addr, size)] of out/scratch_phys + scratch_len
    abi: str                         # the recorded kernel's ABI profile
    release: str | None = None       # its uname -r, when recorded from a running system
    cmdline: str | None = None       # its /proc/cmdline
    memory: int | None = None        # its RAM and NUMA nodes, when the source told them
    nodes: int | None = None
    source: str = ""                 # the snapshot, for the notes
    notes: list = field(default_factory=list)    # what the snapshot reader left out
    # A 7.x root FDT rebuilt past the bytes out/fdt showed (their count), and its children
    # whose address those bytes did not show: khofs places them.
    shown: int | None = None
    unplaced: list = field(default_factory=list)

    @cached_property
    def plan(self) -> Plan:
        """Where its pieces go; RecordingError if it could not be handed over as it is."""
        return _plan(self)


def fdt_problem(blob: bytes) -> str | None:
    """Why blob is not a whole FDT, or None."""
    err = check_header(blob)
    if err:
        return f"not a valid FDT ({libfdt.fdt_strerror(err)})"
    if totalsize(blob) > len(blob):
        return f"truncated FDT ({len(blob)} of the {totalsize(blob)} bytes its header says)"
    return None


def _children(rec: Recording) -> list:
    """The handed-over sub-blobs named in the root FDT, checked against out/sub_fdts."""
    problem = fdt_problem(rec.fdt)
    if problem:
        raise RecordingError("out/fdt", f": {problem}")
    if totalsize(rec.fdt) > PAGE_SIZE:
        raise RecordingError("out/fdt", f": {totalsize(rec.fdt)} bytes, but a root FDT is one "
                             f"page ({PAGE_SIZE} bytes)")
    out = []
    for name, off in subnodes(rec.fdt, 0):
        v3 = getprop(rec.fdt, off, PROP_PRESERVED_DATA) is not None
        prop = getprop(rec.fdt, off, PROP_PRESERVED_DATA if v3 else PROP_SUB_FDT)
        size = getprop(rec.fdt, off, PROP_BLOB_SIZE)
        if prop is None or len(prop) != 8 or (v3 and (size is None or len(size) != 8)):
            continue            # the successor skips such a node; nothing to place
        data = rec.blobs.get(name)
        if data is None:
            raise RecordingError("out/fdt", f" names subtree {name!r} but out/sub_fdts/{name} "
                                 "is not in the recording")
        if size is not None and len(size) == 8 and int.from_bytes(size, "little") != len(data):
            raise RecordingError(f"out/sub_fdts/{name}", f": {len(data)} bytes, but out/fdt's "
                                 f"blob-size says {int.from_bytes(size, 'little')}")
        if not v3 and fdt_problem(data):
            raise RecordingError(f"out/sub_fdts/{name}", f": {fdt_problem(data)}")
        phys = None if name in rec.unplaced else int.from_bytes(prop, "little")
        out.append(Child(name, phys, data))
    return out


def _map_phys(rec: Recording) -> int | None:
    prop = getprop(rec.fdt, 0, PROP_PRESERVED_MEMORY_MAP)
    if prop is None or len(prop) != 8:
        return None             # the successor says it cannot find the map; nothing to write
    phys = int.from_bytes(prop, "little")
    if phys == 0:
        raise RecordingError("out/fdt", "'s preserved-memory-map is 0: the recorded kernel "
                             "hands nothing over until finalized (echo 1 > kho/out/finalize)")
    if phys % PAGE_SIZE:
        raise RecordingError("out/fdt", f"'s preserved-memory-map 0x{phys:x} is not page "
                             "aligned")
    return phys


def _reserve_mem_regions(kids) -> list:
    """(name, start, size) of each region in a memblock-v1 sub-FDT."""
    mb = next((c for c in kids if c.name == MEMBLOCK_KHO_FDT), None)
    if mb is None or node_check_compatible(mb.data, 0, MEMBLOCK_KHO_NODE_COMPATIBLE):
        return []
    out = []
    for name, off in subnodes(mb.data, 0):
        start, size = getprop(mb.data, off, "start"), getprop(mb.data, off, "size")
        if start and size and len(start) == 8 and len(size) == 8:
            out.append((name, int.from_bytes(start, "little"), int.from_bytes(size, "little")))
    return out


def _plan(rec: Recording) -> Plan:
    scratch = [(f"scratch area {n}", a, s) for n, (a, s) in enumerate(rec.scratch) if s]
    phys_file, len_file = (f"out/{n}" for n in get_profile(rec.abi).scratch_files)
    if not scratch:
        raise RecordingError(len_file, " lists no scratch area of nonzero size")
    for i, (what, a, s) in enumerate(scratch):
        if a + s > MAX_PHYS:
            raise RecordingError(phys_file, f": {what} ends past 2^52, the largest "
                                 "physical address")
        for other, a2, s2 in scratch[:i]:
            if a < a2 + s2 and a2 < a + s:
                raise RecordingError(phys_file, f": {other} and {what} overlap")
    if place_segment(rec.scratch, len(encode_scratch(rec.scratch))) is None:
        raise RecordingError(len_file, ": no scratch area can hold the "
                             f"{len(encode_scratch(rec.scratch))}-byte kho_scratch array")
    kids = _children(rec)
    mp = _map_phys(rec)
    regions = _reserve_mem_regions(kids)
    placed = [(f"out/sub_fdts/{c.name}", c.phys, max(len(c.data), 1)) for c in kids
              if c.phys is not None]
    if mp is not None:
        placed.append(("out/fdt's preserved-memory-map", mp, PAGE_SIZE))
    placed += [(f"out/sub_fdts/{MEMBLOCK_KHO_FDT}'s region {n!r}", p, s) for n, p, s in regions]
    for i, (what, phys, size) in enumerate(placed):
        path, _, rest = what.partition("'s ")
        if phys + size > MAX_PHYS:
            raise RecordingError(path, f"{': ' + rest if rest else ''} at 0x{phys:x} ends past "
                                 "2^52, the largest physical address")
        for other, p2, s2 in placed[:i]:
            if phys < p2 + s2 and p2 < phys + size:
                raise RecordingError(path, f"{': ' + rest if rest else ''} at 0x{phys:x} "
                                     f"overlaps {other} at 0x{p2:x}")
        for other, a, s in scratch:
            if phys < a + s and a < phys + size:
                raise RecordingError(path, f"{': ' + rest if rest else ''} at 0x{phys:x} lies "
                                     f"in {other} [0x{a:x}, 0x{a + s:x}), which a kernel never "
                                     "preserves")
    ends = [a + s for _, a, s in scratch] + [p + n for _, p, n in placed]
    return Plan(kids, mp, regions, max(ends))


def _lowest_free(used: RangeSet, size: int, memory: int) -> int:
    """The lowest page-aligned free run of size bytes above the first MiB; it becomes used."""
    at = SZ_1M
    for start, end in used:
        if end <= at:
            continue
        if start >= at + size:
            break
        at = -(-end // PAGE_SIZE) * PAGE_SIZE
    if at + size > memory:
        raise RecordingError("", f"no free {size} bytes left in 0x{memory:x} of memory for what "
                             "debugfs did not place (give more --memory)")
    used.add(at, at + size)
    return at


def _metadata_count(kids) -> int | None:
    """The kexec count a 7.1 kexec-metadata blob gives its reader, if it is one."""
    md = next((c for c in kids if c.name == KHO_METADATA_NODE_NAME), None)
    if md is None or len(md.data) < KEXEC_METADATA.size:
        return None
    version, _, count = KEXEC_METADATA.unpack_from(md.data)
    return count if version == KHO_KEXEC_METADATA_VERSION else None


def replay_handover(rec: Recording, cmdline: str, config, release: str | None) -> Handover:
    """What the recorded kernel's successor receives; config is the next boot's MachineConfig."""
    pl = rec.plan
    kids, mp, regions = [Child(c.name, c.phys, c.data) for c in pl.kids], pl.map_phys, pl.regions
    old = get_profile(rec.abi)
    if pl.extent > config.memory:
        raise RecordingError("", f"the recording reaches 0x{pl.extent:x}: --memory must be at "
                             f"least that (it is 0x{config.memory:x})")
    mem = PhysMem(config.memory, config.nodes)
    memblock = Memblock(mem)
    memblock.reserve(0, SZ_1M)                       # firmware's, as on every boot
    for c in kids:
        if c.phys is not None:
            memblock.reserve(c.phys - c.phys % PAGE_SIZE,
                             max(len(c.data), 1) + c.phys % PAGE_SIZE)
    for _, start, size in regions:
        memblock.reserve(start, size)
    if mp is not None:
        memblock.reserve(mp, PAGE_SIZE)
    scratch = [(a, a + s) for a, s in rec.scratch]
    used = RangeSet(iter(memblock.reserved))
    for a, e in scratch:
        used.add(a, e)
    # The lowest free page: the successor allocates top-down, so a map it misreads (another
    # release's) leaves the root FDT in place longest, as after khofs kexec.
    root = _lowest_free(used, PAGE_SIZE, mem.size)
    memblock.reserve(root, PAGE_SIZE)
    fdt = bytearray(rec.fdt)
    not_recorded = ["the contents of preserved memory: they read as zeros here"]
    if rec.shown is not None:
        not_recorded.append(f"the root FDT past the {rec.shown} bytes out/fdt showed (its size "
                            "was fixed when the file was made): khofs rebuilt its "
                            f"{len(fdt)} bytes the kernel's way")
    for c in kids:
        if c.phys is None:
            # Their pages, like the root FDT's, from the bottom up; the address into the FDT.
            size = -(-max(len(c.data), 1) // PAGE_SIZE) * PAGE_SIZE
            c.phys = _lowest_free(used, size, mem.size)
            memblock.reserve(c.phys, size)
            node = libfdt.Fdt(fdt).path_offset("/" + c.name)
            prop = PROP_PRESERVED_DATA if old.radix else PROP_SUB_FDT
            off = prop_value_offset(fdt, node, prop)
            fdt[off:off + 8] = c.phys.to_bytes(8, "little")
            not_recorded.append(f"where out/sub_fdts/{c.name} lived (past the bytes out/fdt "
                                f"showed): khofs placed it at 0x{c.phys:x}")
    pages = PageAllocator(mem, memblock, scratch)
    kmalloc = Kmalloc(pages)
    mem.write(root, fdt)
    for c in kids:
        mem.write(c.phys, c.data)

    try:
        track = RadixTracker(mem, kmalloc) if old.radix else \
            MemTracker(mem, kmalloc, old.preserve_bits)
        track.preserve_blocks(root >> PAGE_SHIFT, 1, 0)
        for c in kids:
            first = c.phys >> PAGE_SHIFT
            last = (c.phys + max(len(c.data), 1) - 1) >> PAGE_SHIFT
            track.preserve_pages(first, last - first + 1)
        for _, start, size in regions:
            track.preserve_pages(start >> PAGE_SHIFT, -(-size // PAGE_SIZE))
        first = track.serialize()[0] if mp is not None else None
    except KernelError as e:
        if e.errno != errno.ENOMEM:
            raise
        raise RecordingError("", f"no free memory left in 0x{mem.size:x} for the memory map "
                             "khofs writes (give more --memory)") from None
    if mp is not None:
        # Only the root FDT points at the first chunk (or the radix root): move it there.
        mem.write(mp, mem.read(first, PAGE_SIZE))
        mem.clear(first, PAGE_SIZE)
        not_recorded.append(
            f"the memory map's {'tree' if old.radix else 'chunks'}: khofs wrote one at "
            f"0x{mp:x} in the {old.name} format that preserves only the root FDT page, "
            f"{len(kids)} sub-blob(s) and {len(regions)} reserve_mem region(s)")
    not_recorded.append(f"where the root FDT lived: khofs placed it at 0x{root:x}")

    scratch_bytes = encode_scratch(rec.scratch)
    seg = place_segment(rec.scratch, len(scratch_bytes))
    mem.write(seg, scratch_bytes)
    named = {c.name for c in kids}
    ignored = list(rec.notes) + [
        f"out/sub_fdts/{n} is not named in out/fdt: not handed over" for n in sorted(rec.blobs)
        if n not in named]
    cfg = asdict(config)
    cfg["release"] = None
    return Handover(
        cmdline=cmdline, release=release or get_profile(kernel_name(config.abi, release)).release,
        previous_release=rec.release, kexec_count=_metadata_count(kids) or 1, config=cfg,
        fdt_phys=root, scratch_phys=seg, scratch_len=len(scratch_bytes), pages=dict(mem.pages),
        replay={"snapshot": rec.source, "recorded_release": rec.release,
                "recorded_abi": rec.abi, "not_recorded": not_recorded, "ignored": ignored})


def replay_lines(replay: dict | None) -> list:
    """What a replayed boot says of its snapshot, a line each (log, mount, status)."""
    if not replay:
        return []
    rel = replay["recorded_release"] or "an unknown release"
    return ([f"the successor of {rel} (ABI {replay['recorded_abi']}) recorded in "
             f"{replay['snapshot']}"] +
            [f"not in the recording: {n}" for n in replay["not_recorded"]] +
            [f"ignored: {n}" for n in replay["ignored"]])
