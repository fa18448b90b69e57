"""Simulated physical memory: NUMA nodes, a sparse page store and memblock-style allocation.

Only pages that ever held data exist in the store; everything else reads as zero. Addresses
are plain ints; ranges are half-open [start, end).
"""

import bisect
import errno

from .errors import KernelError

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
SZ_1M = 1 << 20
SZ_2M = 2 << 20
SZ_4G = 1 << 32
# x86: ARCH_LOW_ADDRESS_LIMIT is 4 GiB - 1; pageblocks (CMA_MIN_ALIGNMENT_BYTES) are 2 MiB.
ARCH_LOW_ADDRESS_LIMIT = SZ_4G - 1
CMA_MIN_ALIGNMENT_BYTES = SZ_2M
SMP_CACHE_BYTES = 64
NUMA_NO_NODE = -1
MEMBLOCK_ALLOC_ANYWHERE = (1 << 64) - 1


def round_down(x: int, a: int) -> int:
    """x rounded down to a multiple of a."""
    return x // a * a


class RangeSet:
    """Sorted, merged, disjoint half-open ranges."""

    def __init__(self, ranges=()):
        self.starts: list[int] = []
        self.ends: list[int] = []
        for s, e in ranges:
            self.add(s, e)

    def __iter__(self):
        return zip(self.starts, self.ends)

    def __len__(self):
        return len(self.starts)

    def add(self, start: int, end: int) -> None:
        """Add [start, end), merging with its neighbours."""
        if end <= start:
            return
        i = bisect.bisect_left(self.ends, start)
        j = bisect.bisect_right(self.starts, end)
        if i < j:
            start = min(start, self.starts[i])
            end = max(end, self.ends[j - 1])
        self.starts[i:j] = [start]
        self.ends[i:j] = [end]

    def remove(self, start: int, end: int) -> None:
        """Remove [start, end), splitting ranges it cuts."""
        if end <= start:
            return
        i = bisect.bisect_right(self.ends, start)
        j = bisect.bisect_left(self.starts, end)
        if i >= j:
            return
        new_s, new_e = [], []
        if self.starts[i] < start:
            new_s.append(self.starts[i])
            new_e.append(start)
        if self.ends[j - 1] > end:
            new_s.append(end)
            new_e.append(self.ends[j - 1])
        self.starts[i:j] = new_s
        self.ends[i:j] = new_e

    def overlaps(self, start: int, end: int) -> bool:
        """Whether any of [start, end) is in the set."""
        i = bisect.bisect_right(self.ends, start)
        return i < len(self.starts) and self.starts[i] < end

    def contains(self, start: int, end: int) -> bool:
        """Whether all of [start, end) is in one range of the set."""
        i = bisect.bisect_right(self.starts, start) - 1
        return i >= 0 and self.ends[i] >= end

    def total(self) -> int:
        """Bytes in the set."""
        return sum(e - s for s, e in self)


class PhysMem:
    """RAM split evenly over NUMA nodes, starting at physical address 0."""

    def __init__(self, size: int, nodes: int = 1):
        if nodes < 1:
            raise ValueError("at least one NUMA node is needed")
        per_node = round_down(size // nodes, SZ_2M)
        if per_node < 16 * SZ_1M:
            raise ValueError(f"{size:#x} bytes over {nodes} nodes leaves less than 16 MiB per node")
        self.size = per_node * nodes
        self.nodes = [(nid * per_node, (nid + 1) * per_node) for nid in range(nodes)]
        self.pages: dict[int, bytearray] = {}

    def node_of(self, phys: int) -> int:
        """The NUMA node holding phys."""
        for nid, (s, e) in enumerate(self.nodes):
            if s <= phys < e:
                return nid
        return NUMA_NO_NODE

    def check_range(self, phys: int, size: int) -> None:
        """EFAULT unless [phys, phys + size) is inside memory."""
        if phys < 0 or size < 0 or phys + size > self.size:
            raise KernelError(errno.EFAULT, f"[{phys:#x}, {phys + size:#x}) is outside memory (0x0-{self.size:#x})")

    def read(self, phys: int, size: int) -> bytes:
        """size bytes at phys (pages never written read as zeros)."""
        self.check_range(phys, size)
        pfn, off = divmod(phys, PAGE_SIZE)
        if off + size <= PAGE_SIZE:         # within one page: most reads of a blob file
            page = self.pages.get(pfn)
            return bytes(page[off:off + size]) if page is not None else bytes(size)
        out = bytearray()
        while size > 0:
            pfn, off = divmod(phys, PAGE_SIZE)
            n = min(size, PAGE_SIZE - off)
            page = self.pages.get(pfn)
            out += page[off:off + n] if page is not None else bytes(n)
            phys += n
            size -= n
        return bytes(out)

    def write(self, phys: int, data) -> None:
        """Write data at phys."""
        data = memoryview(bytes(data))
        self.check_range(phys, len(data))
        pos = 0
        while pos < len(data):
            pfn, off = divmod(phys + pos, PAGE_SIZE)
            n = min(len(data) - pos, PAGE_SIZE - off)
            self.page(pfn)[off:off + n] = data[pos:pos + n]
            pos += n

    def page(self, pfn: int) -> bytearray:
        """The bytes of one page, created (zeroed) on first use; writes go straight to memory."""
        p = self.pages.get(pfn)
        if p is None:
            p = self.pages[pfn] = bytearray(PAGE_SIZE)
        return p

    def clear(self, phys: int, size: int) -> None:
        """Forget the contents of whole pages (they read as zero again)."""
        for pfn in range(phys // PAGE_SIZE, (phys + size + PAGE_SIZE - 1) // PAGE_SIZE):
            self.pages.pop(pfn, None)


class Memblock:
    """The boot allocator: memory regions, reserved regions, top-down placement like memblock."""

    def __init__(self, mem: PhysMem):
        self.mem = mem
        self.reserved = RangeSet()
        # During a KHO boot, memblock allocates only from the scratch areas until
        # kho_memory_init() (memblock_set_kho_scratch_only).
        self.scratch_only: RangeSet | None = None
        # (base, size) of reservations flagged MEMBLOCK_RSRV_KERN: what the kernel allocated.
        self.kern: list[tuple[int, int]] = []

    def reserve(self, base: int, size: int, kern: bool = False) -> None:
        """memblock_reserve; kern marks the kernel's own reservations."""
        self.reserved.add(base, base + size)
        if kern and size:
            self.kern.append((base, size))

    def free(self, base: int, size: int) -> None:
        """memblock_free."""
        self.reserved.remove(base, base + size)
        self.kern = [(b, s) for b, s in self.kern if not (b >= base and b + s <= base + size)]

    def _free_ranges(self, nid: int):
        """Free memory ranges (not reserved), highest first, limited to one node if nid >= 0."""
        out = []
        for n, (ms, me) in enumerate(self.mem.nodes):
            if nid != NUMA_NO_NODE and n != nid:
                continue
            cur = ms
            for rs, re_ in self.reserved:
                if re_ <= ms or rs >= me:
                    continue
                if rs > cur:
                    out.append((cur, min(rs, me)))
                cur = max(cur, re_)
            if cur < me:
                out.append((cur, me))
        if self.scratch_only is not None:
            clipped = []
            for fs, fe in out:
                for ss, se in self.scratch_only:
                    if max(fs, ss) < min(fe, se):
                        clipped.append((max(fs, ss), min(fe, se)))
            out = clipped
        out.sort(reverse=True)
        return out

    def find_in_range_node(self, size: int, align: int, start: int, end: int, nid: int):
        """memblock_find_in_range_node, top-down. Returns the base or None."""
        end = min(end, self.mem.size)
        start = max(start, PAGE_SIZE)
        for fs, fe in self._free_ranges(nid):
            fs, fe = max(fs, start), min(fe, end)
            if fe < fs or fe < size:
                continue
            cand = round_down(fe - size, align)
            if cand >= fs:
                return cand
        return None

    def alloc_range_nid(self, size: int, align: int, start: int, end: int, nid: int = NUMA_NO_NODE,
                        exact_nid: bool = False):
        """memblock_alloc_range_nid: the allocation is marked as the kernel's own. 0 on failure."""
        if not align:
            align = SMP_CACHE_BYTES
        found = self.find_in_range_node(size, align, start, end, nid)
        if found is None and nid != NUMA_NO_NODE and not exact_nid:
            found = self.find_in_range_node(size, align, start, end, NUMA_NO_NODE)
        if found is None:
            return 0
        self.reserve(found, size, kern=True)
        return found

    def phys_alloc(self, size: int, align: int) -> int:
        """memblock_phys_alloc: size bytes at align, anywhere."""
        return self.alloc_range_nid(size, align, 0, MEMBLOCK_ALLOC_ANYWHERE)

    def reserved_kern_size(self, limit: int, nid: int) -> int:
        """memblock_reserved_kern_size: kernel-owned reservations below limit (on nid)."""
        total = 0
        for base, size in sorted(self.kern):
            if base > limit:
                break
            if base + size > limit:
                size = limit - base
            if nid == NUMA_NO_NODE or self.mem.node_of(base) == nid:
                total += size
        return total


class PageAllocator:
    """The runtime page allocator (the buddy allocator's role after boot).

    Hands out zeroed pages top-down from memory that neither memblock reserved nor the scratch
    areas cover: scratch is CMA after boot, and the kernel's own allocations avoid it.
    """

    def __init__(self, mem: PhysMem, memblock: Memblock, scratch_ranges=()):
        self.mem = mem
        self.used = RangeSet(iter(memblock.reserved))
        for s, e in scratch_ranges:
            self.used.add(s, e)

    def alloc_pages(self, order: int = 0) -> int:
        """alloc_pages: 2**order pages, aligned to their size."""
        return self.alloc_range(1 << order, PAGE_SIZE << order)

    def alloc_range(self, nr_pages: int, align: int = PAGE_SIZE) -> int:
        """nr_pages contiguous zeroed pages, top-down (alloc_contig_pages' role)."""
        size = nr_pages * PAGE_SIZE
        cur_end = self.mem.size
        # Walk the gaps between used ranges from the top down.
        starts, ends = self.used.starts, self.used.ends
        i = len(starts) - 1
        while True:
            # Reservations may name memory that does not exist (a corrupt incoming map).
            gap_start = min(ends[i], self.mem.size) if i >= 0 else 0
            gap_end = min(cur_end, self.mem.size)
            cand = round_down(gap_end - size, align) if gap_end >= size else -1
            if cand >= gap_start and cand >= PAGE_SIZE:
                self.used.add(cand, cand + size)
                self.mem.clear(cand, size)
                return cand
            if i < 0:
                raise KernelError(errno.ENOMEM, f"no {nr_pages} free contiguous pages left in simulated memory")
            cur_end = starts[i]
            i -= 1

    def free_pages(self, phys: int, order: int = 0) -> None:
        """free_pages of an alloc_pages block."""
        self.free_range(phys, 1 << order)

    def free_range(self, phys: int, nr_pages: int) -> None:
        """Free nr_pages pages at phys; their contents are gone."""
        size = nr_pages * PAGE_SIZE
        self.used.remove(phys, phys + size)
        self.mem.clear(phys, size)


class Kmalloc:
    """kzalloc/kfree over the page allocator: whole pages, or slab objects for small sizes."""

    def __init__(self, pages: PageAllocator):
        self.pages = pages
        self.free_objs: dict[int, list[int]] = {}
        self.obj_size: dict[int, int] = {}

    def kzalloc(self, size: int) -> int:
        """kzalloc: zeroed memory, from pages for a page or more."""
        if size >= PAGE_SIZE:
            order = max(0, (size - 1).bit_length() - PAGE_SHIFT)
            phys = self.pages.alloc_pages(order)
            self.obj_size[phys] = PAGE_SIZE << order
            return phys
        slab = 1 << max(3, (size - 1).bit_length())
        free = self.free_objs.setdefault(slab, [])
        if not free:
            page = self.pages.alloc_pages(0)
            free.extend(range(page + PAGE_SIZE - slab, page - 1, -slab))
        phys = free.pop()
        self.obj_size[phys] = slab
        self.pages.mem.write(phys, bytes(slab))
        return phys

    def kfree(self, phys: int) -> None:
        """kfree of a kzalloc address."""
        size = self.obj_size.pop(phys)
        if size >= PAGE_SIZE:
            self.pages.free_pages(phys, size.bit_length() - 1 - PAGE_SHIFT)
        else:
            self.free_objs[size].append(phys)
