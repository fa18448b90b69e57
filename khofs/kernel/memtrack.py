"""The preservation tracker and its serialized form, the khoser_mem_chunk list.

Like the kernel, the tracker keeps, per order, sparse bitmaps that live in (simulated) memory
pages; serialization writes chunks that point at those very bitmaps. Nothing here is per page:
ranges become bitmap slices, so terabytes of preserved memory stay cheap.
"""

import errno
import struct

from .errors import KernelError
from .physmem import PAGE_SHIFT, PAGE_SIZE, Kmalloc, PhysMem

CHUNK_HDR = struct.Struct("<QII")           # next, order, num_elms
CHUNK_ELM = struct.Struct("<QQ")            # phys_start, bitmap
KHOSER_BITMAP_SIZE = (PAGE_SIZE - CHUNK_HDR.size) // CHUNK_ELM.size   # 255


def _set_bits(bm: memoryview, lo: int, hi: int, value: bool) -> None:
    """Set or clear bits [lo, hi) of a Linux bitmap held as little-endian bytes."""
    if hi <= lo:
        return
    b0, b1 = lo >> 3, (hi - 1) >> 3
    m0 = (0xFF << (lo & 7)) & 0xFF
    m1 = 0xFF >> (7 - ((hi - 1) & 7))
    if b0 == b1:
        m0 &= m1
    if value:
        bm[b0] |= m0
        if b1 > b0:
            bm[b0 + 1:b1] = b"\xff" * (b1 - b0 - 1)
            bm[b1] |= m1
    else:
        bm[b0] &= 0xFF ^ m0
        if b1 > b0:
            bm[b0 + 1:b1] = bytes(b1 - b0 - 1)
            bm[b1] &= 0xFF ^ m1


def bitmap_runs(bm: bytes):
    """(first, last+1) bit index of every run of set bits (Linux bitmap: LSB first)."""
    if not any(bm):
        return []
    if bm.count(0xFF) == len(bm):
        return [(0, len(bm) * 8)]
    x = int.from_bytes(bm, "little")
    runs = []
    pos = 0
    while x:
        low = (x & -x).bit_length() - 1            # first set bit
        x >>= low
        ones = (~x & (x + 1)).bit_length() - 1       # length of the run of ones
        runs.append((pos + low, pos + low + ones))
        x >>= ones
        pos += low + ones
    return runs


def split_orders(pfn: int, end_pfn: int):
    """The kernel's greedy split of [pfn, end_pfn) into naturally aligned blocks."""
    while pfn < end_pfn:
        tz = (pfn & -pfn).bit_length() - 1 if pfn else 64
        order = min(tz, (end_pfn - pfn).bit_length() - 1)
        yield pfn, order
        pfn += 1 << order


class PageRanges:
    """Page ranges over a tracker's preserve_blocks/unpreserve_blocks, both map formats."""

    def preserve_pages(self, pfn: int, nr_pages: int, node_of=None) -> None:
        """Preserve a page range as the largest aligned blocks (with node_of, within one
        NUMA node, as 7.1 does); all or nothing."""
        done = []
        p, end = pfn, pfn + nr_pages
        try:
            while p < end:
                _, order = next(split_orders(p, end))
                while node_of and order and node_of(p << PAGE_SHIFT) != \
                        node_of((p + (1 << order) - 1) << PAGE_SHIFT):
                    order -= 1
                self.preserve_blocks(p, 1, order)
                done.append((p, order))
                p += 1 << order
        except Exception:
            for p, order in done:
                self.unpreserve_blocks(p, 1, order)
            raise

    def unpreserve_pages(self, pfn: int, nr_pages: int) -> None:
        """Unpreserve a page range split as preserve_pages split it."""
        for p, order in split_orders(pfn, pfn + nr_pages):
            self.unpreserve_blocks(p, 1, order)


class MemTracker(PageRanges):
    """kho_mem_track: order -> {bitmap index -> phys of a bitmap of `bits` bits}."""

    def __init__(self, mem: PhysMem, kmalloc: Kmalloc, bits: int):
        self.mem = mem
        self.kmalloc = kmalloc
        self.bits = bits                 # PRESERVE_BITS
        self.bitmap_bytes = bits // 8
        self.orders: dict[int, dict[int, int]] = {}

    def _bitmap(self, phys: int) -> memoryview:
        pfn, off = divmod(phys, PAGE_SIZE)
        return memoryview(self.mem.page(pfn))[off:off + self.bitmap_bytes]

    def set_range(self, first: int, count: int, order: int) -> None:
        """Mark `count` consecutive order-`order` blocks, the first at block index `first`."""
        physxa = self.orders.get(order)
        if physxa is None:
            physxa = self.orders[order] = {}
        pos, end = first, first + count
        while pos < end:
            idx, lo = divmod(pos, self.bits)
            hi = min(self.bits, lo + (end - pos))
            bphys = physxa.get(idx)
            if bphys is None:
                bphys = physxa[idx] = self.kmalloc.kzalloc(self.bitmap_bytes)
            _set_bits(self._bitmap(bphys), lo, hi, True)
            pos += hi - lo

    def clear_range(self, first: int, count: int, order: int) -> None:
        """Clear bits; like the kernel, empty bitmaps are kept (and serialized)."""
        physxa = self.orders.get(order)
        if physxa is None:
            return
        pos, end = first, first + count
        while pos < end:
            idx, lo = divmod(pos, self.bits)
            hi = min(self.bits, lo + (end - pos))
            bphys = physxa.get(idx)
            if bphys is not None:
                _set_bits(self._bitmap(bphys), lo, hi, False)
            pos += hi - lo

    def preserve_blocks(self, pfn: int, count: int, order: int) -> None:
        """Mark count order-`order` blocks from pfn preserved."""
        if pfn % (1 << order):
            raise KernelError(errno.EINVAL, f"pfn {pfn:#x} is not aligned to order {order}")
        self.set_range(pfn >> order, count, order)

    def unpreserve_blocks(self, pfn: int, count: int, order: int) -> None:
        """Clear count order-`order` blocks from pfn."""
        self.clear_range(pfn >> order, count, order)

    def destroy(self) -> None:
        """Free every bitmap and forget all preservations (kho_abort's first half)."""
        for physxa in self.orders.values():
            for bphys in physxa.values():
                self.kmalloc.kfree(bphys)
        self.orders = {}

    def preserved_bytes(self) -> int:
        """Bytes marked preserved, all orders."""
        total = 0
        for order, physxa in self.orders.items():
            n = sum(int.from_bytes(self._bitmap(b), "little").bit_count() for b in physxa.values())
            total += n << (order + PAGE_SHIFT)
        return total

    def is_preserved(self, phys: int, order: int) -> bool:
        """Whether the order-`order` block at phys is preserved."""
        blk = phys >> (PAGE_SHIFT + order)
        bphys = self.orders.get(order, {}).get(blk // self.bits)
        if bphys is None:
            return False
        b = blk % self.bits
        return bool(self._bitmap(bphys)[b >> 3] & (1 << (b & 7)))

    def serialize(self) -> tuple[int, list[int]]:
        """kho_mem_serialize: write the chunk list. Returns (first chunk phys or 0, chunk pages)."""
        chunks: list[int] = []
        cur = None
        nelms = 0

        def new_chunk(order: int) -> int:
            phys = self.kmalloc.kzalloc(PAGE_SIZE)
            self.mem.write(phys, CHUNK_HDR.pack(0, order, 0))
            if chunks:
                self.mem.write(chunks[-1], struct.pack("<Q", phys))
            chunks.append(phys)
            return phys

        try:
            for order in sorted(self.orders):
                cur, nelms = new_chunk(order), 0
                for idx in sorted(self.orders[order]):
                    if nelms == KHOSER_BITMAP_SIZE:
                        cur, nelms = new_chunk(order), 0
                    start = (idx * self.bits) << (order + PAGE_SHIFT)
                    self.mem.write(cur + CHUNK_HDR.size + nelms * CHUNK_ELM.size,
                                   CHUNK_ELM.pack(start, self.orders[order][idx]))
                    nelms += 1
                    self.mem.write(cur + 12, struct.pack("<I", nelms))
        except KernelError:
            for c in chunks:
                self.kmalloc.kfree(c)
            raise
        return (chunks[0] if chunks else 0), chunks


class MapError(Exception):
    """The serialized memory map cannot be walked."""


def walk_memory_map(mem: PhysMem, first: int, bits: int):
    """The next kernel's reader: yields (order, phys, size) runs of preserved blocks.

    Consecutive set bits (also across bitmaps) become one run of blocks of one order.
    """
    yield from merge_runs(_walk_bitmaps(mem, first, bits))


def merge_runs(runs):
    """(order, phys, size) runs with each run of one order that continues the last merged in."""
    pending = None
    for run in runs:
        if pending and pending[0] == run[0] and pending[1] + pending[2] == run[1]:
            pending = (pending[0], pending[1], pending[2] + run[2])
            continue
        if pending:
            yield pending
        pending = run
    if pending:
        yield pending


def iter_chunks(mem: PhysMem, first: int):
    """(phys, (next, order, num_elms), page) of each khoser_mem_chunk, in list order.

    Raises MapError at a chunk that is not a page of memory, or a loop: where the kernel
    would fault or never end (each chunk a distinct page, so the walk is bounded).
    """
    phys = first
    seen = set()
    while phys:
        if phys % PAGE_SIZE or phys + PAGE_SIZE > mem.size:
            raise MapError(f"chunk at {phys:#x} is not a page of memory")
        if phys in seen:
            raise MapError(f"chunk list loops back to {phys:#x}")
        seen.add(phys)
        page = mem.read(phys, PAGE_SIZE)
        hdr = CHUNK_HDR.unpack_from(page)
        yield phys, hdr, page
        phys = hdr[0]


def chunk_elements(page: bytes, num: int):
    """(phys_start, bitmap) of a chunk page's first num elements."""
    return [CHUNK_ELM.unpack_from(page, CHUNK_HDR.size + i * CHUNK_ELM.size) for i in range(num)]


def _walk_bitmaps(mem: PhysMem, first: int, bits: int):
    bitmap_bytes = bits // 8
    for phys, (_, order, num), page in iter_chunks(mem, first):
        if num > KHOSER_BITMAP_SIZE:
            raise MapError(f"chunk at {phys:#x} claims {num} bitmaps (at most {KHOSER_BITMAP_SIZE})")
        if order > 64 - PAGE_SHIFT:
            raise MapError(f"chunk at {phys:#x} has order {order}")
        bsize = 1 << (order + PAGE_SHIFT)
        for start, bphys in chunk_elements(page, num):
            if bphys + bitmap_bytes > mem.size:
                raise MapError(f"bitmap at {bphys:#x} is outside memory")
            bm = mem.read(bphys, bitmap_bytes)
            for lo, hi in bitmap_runs(bm):
                yield order, start + lo * bsize, (hi - lo) * bsize
