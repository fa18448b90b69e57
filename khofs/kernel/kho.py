"""kho_out: the outgoing handover (tracker, producers, finalize/abort, debugfs blob list)."""

import errno
from dataclasses import dataclass, field
from typing import Callable

from .errors import KernelError
from .fdt import PageFdtSw, prop_value_offset, totalsize, u64
from .memtrack import MemTracker
from .physmem import PAGE_SHIFT, PAGE_SIZE, Kmalloc, PageAllocator, PhysMem
from .profile import Profile

KHO_FDT_COMPATIBLE = "kho-v1"
PROP_PRESERVED_MEMORY_MAP = "preserved-memory-map"
PROP_SUB_FDT = "fdt"


class Producer:
    """A KHO user on the notifier chain (KEXEC_KHO_FINALIZE / KEXEC_KHO_ABORT)."""

    name = "producer"

    def finalize(self, kho: "KhoOut") -> None:
        """Preserve memory and kho_add_subtree(); raise KernelError to fail the finalize."""

    def abort(self, kho: "KhoOut") -> None:
        """Raise KernelError to fail the abort."""


@dataclass
class Blob:
    """A debugfs blob: a window of `size` bytes at `phys` (size fixed when created)."""
    name: str
    phys: int
    size: int
    seq: int = 0


@dataclass
class KhoOut:
    mem: PhysMem
    pages: PageAllocator
    kmalloc: Kmalloc
    profile: Profile
    log: Callable[[str], None]
    finalized: bool = False
    producers: list = field(default_factory=list)
    # debugfs entries made by finalize: out/fdt and out/sub_fdts/NAME (kho_out.ser.fdt_list)
    fdt_list: list = field(default_factory=list)
    preserved_mem_map: int = 0
    map_chunks: list = field(default_factory=list)
    seq: int = 0
    generation: int = 0      # bumped whenever fdt_list changes

    def __post_init__(self):
        self.track = MemTracker(self.mem, self.kmalloc, self.profile.preserve_bits)
        # kho_init: the root FDT lives in one page for the kernel's lifetime.
        self.fdt_page = self.pages.alloc_pages(0)

    # -- preservation API -------------------------------------------------
    def _check_busy(self):
        if self.finalized:
            raise KernelError(errno.EBUSY, "KHO is finalized: preservations are frozen")

    def _check_range(self, phys: int, size: int):
        if phys % PAGE_SIZE or size % PAGE_SIZE:
            raise KernelError(errno.EINVAL, f"range {phys:#x}+{size:#x} is not page aligned")
        self.mem.check_range(phys, size)

    def preserve_folio(self, phys: int, order: int) -> None:
        """kho_preserve_folio: one bit for a folio of 2**order pages."""
        self._check_busy()
        if not 0 <= order <= 64 - PAGE_SHIFT - 1:
            raise KernelError(errno.EINVAL, f"order {order} is out of range")
        self._check_range(phys, PAGE_SIZE << order)
        if phys % (PAGE_SIZE << order):
            raise KernelError(errno.EINVAL, f"{phys:#x} is not aligned to an order-{order} folio")
        self.track.preserve_blocks(phys >> PAGE_SHIFT, 1, order)

    def preserve_folios(self, phys: int, count: int, order: int) -> None:
        """`count` consecutive kho_preserve_folio calls, done as one bitmap operation."""
        self._check_busy()
        self._check_range(phys, count * (PAGE_SIZE << order))
        if phys % (PAGE_SIZE << order):
            raise KernelError(errno.EINVAL, f"{phys:#x} is not aligned to an order-{order} folio")
        self.track.preserve_blocks(phys >> PAGE_SHIFT, count, order)

    def preserve_pages(self, phys: int, size: int) -> None:
        """kho_preserve_pages (kho_preserve_phys in 6.16): split greedily into orders."""
        self._check_busy()
        self._check_range(phys, size)
        self.track.preserve_pages(phys >> PAGE_SHIFT, size >> PAGE_SHIFT)

    def preserve_pfns(self, pfn: int, nr_pages: int) -> None:
        """kho_preserve_pages(pfn_to_page(pfn), nr_pages), as kernel users call it."""
        self._check_busy()
        self.mem.check_range(pfn << PAGE_SHIFT, nr_pages << PAGE_SHIFT)
        self.track.preserve_pages(pfn, nr_pages)

    def unpreserve_folio(self, phys: int, order: int) -> None:
        self._check_busy()
        self._check_range(phys, PAGE_SIZE << order)
        self.track.unpreserve_blocks(phys >> PAGE_SHIFT, 1, order)

    def unpreserve_pages(self, phys: int, size: int) -> None:
        self._check_busy()
        self._check_range(phys, size)
        self.track.unpreserve_pages(phys >> PAGE_SHIFT, size >> PAGE_SHIFT)

    # -- producers ----------------------------------------------------------
    def register_notifier(self, producer: Producer, first: bool = False) -> None:
        if first:
            self.producers.insert(0, producer)
        else:
            self.producers.append(producer)

    def unregister_notifier(self, producer: Producer) -> None:
        self.producers.remove(producer)

    def _debugfs_add(self, dirname: str, name: str, phys: int) -> None:
        if any(b.name == name and d == dirname for d, b in self.fdt_list):
            raise KernelError(errno.EEXIST, f"debugfs entry {dirname}/{name} exists")
        self.seq += 1
        self.generation += 1
        self.fdt_list.append((dirname, Blob(name, phys, totalsize(self.mem.read(phys, 8)), self.seq)))

    def add_subtree(self, name: str, fdt_phys: int) -> None:
        """kho_add_subtree: a child NAME { fdt = <phys> } in the root FDT, and its debugfs blob."""
        sw = self._sw
        sw.begin_node(name)
        sw.property(PROP_SUB_FDT, u64(fdt_phys))
        sw.end_node()
        self._debugfs_add("sub_fdts", name, fdt_phys)

    # -- finalize / abort ---------------------------------------------------
    def _finalize(self) -> None:
        self._sw = sw = PageFdtSw(PAGE_SIZE)
        try:
            sw.finish_reservemap()
            sw.begin_node("")
            sw.property_string("compatible", KHO_FDT_COMPATIBLE)
            sw.property(PROP_PRESERVED_MEMORY_MAP, u64(0))    # placeholder, patched below
            self.preserve_folio(self.fdt_page, 0)
            for p in self.producers:
                p.finalize(self)
            self.preserved_mem_map, self.map_chunks = self.track.serialize()
            sw.end_node()
            page = sw.finish()
        finally:
            self._sw = None
        off = prop_value_offset(page, 0, PROP_PRESERVED_MEMORY_MAP)
        page[off:off + 8] = u64(self.preserved_mem_map)
        self.mem.write(self.fdt_page, page)

    def _abort(self) -> None:
        self.track.destroy()
        for c in self.map_chunks:
            self.kmalloc.kfree(c)
        self.preserved_mem_map, self.map_chunks = 0, []
        for p in self.producers:
            p.abort(self)

    def finalize(self) -> None:
        try:
            self._finalize()
        except KernelError as e:
            self.log(f"KHO: Failed to convert KHO state tree: {-e.errno}")
            try:
                self._abort()
            except KernelError:
                pass
            raise

    def abort(self) -> None:
        try:
            self._abort()
        except KernelError as e:
            self.log(f"KHO: Failed to abort KHO finalization: {-e.errno}")
            raise

    def set_finalize(self, val: int) -> None:
        """kho_out_finalize_set: the write handler of out/finalize."""
        want = bool(val)
        if want == self.finalized:
            if self.finalized:
                raise KernelError(errno.EEXIST, "KHO is already finalized")
            raise KernelError(errno.ENOENT, "KHO is not finalized")
        if want:
            self.finalize()
        else:
            self.abort()
        self.finalized = want
        # kho_out_update_debugfs_fdt
        if want:
            self._debugfs_add("out", "fdt", self.fdt_page)
        else:
            self.fdt_list.clear()
            self.generation += 1

    # -- views ----------------------------------------------------------------
    def blobs(self, dirname: str):
        return [b for d, b in self.fdt_list if d == dirname]

    def root_fdt(self) -> bytes:
        return self.mem.read(self.fdt_page, totalsize(self.mem.read(self.fdt_page, 8)))
