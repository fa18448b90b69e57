"""kho_out: the outgoing handover (tracker, producers, finalize/abort, debugfs blob list)."""

import errno
from dataclasses import dataclass, field
from typing import Callable

import libfdt

from .errors import KernelError
from .fdt import PageFdtSw, prop_value_offset, totalsize, u64
from .kho_fdt import (KEXEC_METADATA, KHO_KEXEC_METADATA_VERSION, KHO_METADATA_NODE_NAME,
                      PROP_PRESERVED_MEMORY_MAP, PROP_SUB_FDT, add_subtree_in_place,
                      new_root_fdt)
from .memtrack import MemTracker
from .radix import RadixTracker
from .physmem import PAGE_SHIFT, PAGE_SIZE, Kmalloc, PageAllocator, PhysMem
from .profile import Profile

class Producer:
    """A KHO user on the notifier chain (KEXEC_KHO_FINALIZE / KEXEC_KHO_ABORT)."""

    name = "producer"

    def finalize(self, kho: "KhoOut") -> None:
        """Preserve memory and kho_add_subtree(); raise KernelError to fail the finalize."""

    def abort(self, kho: "KhoOut") -> None:
        """Raise KernelError to fail the abort."""

    def init_subtree(self, kho: "KhoOut") -> None:
        """6.19+: preserve and kho_add_subtree() when the user comes up, not at finalize."""

    def remove_subtree(self, kho: "KhoOut") -> None:
        """6.19+: kho_remove_subtree() and give back what init_subtree preserved."""


@dataclass
class Blob:
    """A debugfs blob: a window of `size` bytes at `phys` (size fixed when created)."""
    name: str
    phys: int
    size: int
    seq: int = 0


@dataclass
class KhoOut:
    """The outgoing side of KHO: preservations, producers, finalize and abort."""
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
    cold_boot: bool = True   # no handover was accepted (6.19+: out/fdt exists only then)
    release: str = ""
    in_kexec_count: int = 0  # kho_in.kexec_count (7.1 kexec-metadata), 0 on a cold boot

    def __post_init__(self):
        prof = self.profile
        self.metadata_phys = None
        if prof.radix:
            self.track = RadixTracker(self.mem, self.kmalloc)
        else:
            self.track = MemTracker(self.mem, self.kmalloc, prof.preserve_bits)
        if not prof.fdt_at_boot:
            # kho_init: the root FDT lives in one page for the kernel's lifetime.
            self.fdt_page = self.pages.alloc_pages(0)
            return
        # kho_init: kho_alloc_preserve(PAGE_SIZE), then kho_out_fdt_setup.
        self.fdt_page = self.alloc_preserve(PAGE_SIZE)
        self.mem.write(self.fdt_page, new_root_fdt(prof, self.track.root if prof.radix else 0))
        if prof.kexec_metadata:
            # kho_out_kexec_metadata: the release and count for the next kernel.
            self.metadata_phys = self.alloc_preserve(KEXEC_METADATA.size)
            self.mem.write(self.metadata_phys, KEXEC_METADATA.pack(
                KHO_KEXEC_METADATA_VERSION, self.release.encode()[:64],
                (self.in_kexec_count + 1) & 0xFFFFFFFF))
            self.add_subtree(KHO_METADATA_NODE_NAME, self.metadata_phys, KEXEC_METADATA.size)
        if self.cold_boot:
            # The out/fdt blob's size is fixed here; later subtrees grow the FDT past it.
            self._debugfs_add("out", "fdt", self.fdt_page, totalsize(self.root_fdt()))

    def alloc_preserve(self, size: int) -> int:
        """kho_alloc_preserve: zeroed pages of get_order(size), preserved as one folio."""
        order = max(0, (size - 1).bit_length() - PAGE_SHIFT)
        phys = self.pages.alloc_pages(order)
        try:
            self.preserve_folio(phys, order)
        except KernelError:
            self.pages.free_pages(phys, order)
            raise
        return phys

    # -- preservation API -------------------------------------------------
    def _check_busy(self):
        # 6.19+ keeps accepting preservations after a finalize.
        if self.finalized and not self.profile.fdt_at_boot:
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
        self._preserve_pages(phys >> PAGE_SHIFT, size >> PAGE_SHIFT)

    def _preserve_pages(self, pfn, nr_pages):
        if self.profile.radix:
            self.track.preserve_pages(pfn, nr_pages, self.mem.node_of)
        else:
            self.track.preserve_pages(pfn, nr_pages)

    def preserve_pfns(self, pfn: int, nr_pages: int) -> None:
        """kho_preserve_pages(pfn_to_page(pfn), nr_pages), as kernel users call it."""
        self._check_busy()
        self.mem.check_range(pfn << PAGE_SHIFT, nr_pages << PAGE_SHIFT)
        self._preserve_pages(pfn, nr_pages)

    def unpreserve_folio(self, phys: int, order: int) -> None:
        """kho_unpreserve_folio."""
        self._check_busy()
        self._check_range(phys, PAGE_SIZE << order)
        self.track.unpreserve_blocks(phys >> PAGE_SHIFT, 1, order)

    def unpreserve_pages(self, phys: int, size: int) -> None:
        """kho_unpreserve_pages of [phys, phys + size)."""
        self._check_busy()
        self._check_range(phys, size)
        self.track.unpreserve_pages(phys >> PAGE_SHIFT, size >> PAGE_SHIFT)

    # -- producers ----------------------------------------------------------
    def register_notifier(self, producer: Producer, first: bool = False) -> None:
        """register_kho_notifier: a producer asked at finalize and abort."""
        if first:
            self.producers.insert(0, producer)
        else:
            self.producers.append(producer)

    def unregister_notifier(self, producer: Producer) -> None:
        """unregister_kho_notifier."""
        self.producers.remove(producer)

    def add_producer(self, producer: Producer, first: bool = False) -> None:
        """A KHO user comes up: from 6.19 its subtree goes in now, before that at finalize
        (on the notifier chain, first in line if asked)."""
        if self.profile.fdt_at_boot:
            producer.init_subtree(self)
        else:
            self.register_notifier(producer, first)

    def remove_producer(self, producer: Producer) -> bool:
        """A KHO user goes away. True when no handover points at its pages any more (a
        finalized root FDT before 6.19 still does)."""
        if self.profile.fdt_at_boot:
            producer.remove_subtree(self)
            return True
        self.unregister_notifier(producer)
        return not self.finalized

    def _debugfs_add(self, dirname: str, name: str, phys: int, size: int | None = None) -> None:
        if any(b.name == name and d == dirname for d, b in self.fdt_list):
            raise KernelError(errno.EEXIST, f"debugfs entry {dirname}/{name} exists")
        self.seq += 1
        self.generation += 1
        if size is None:
            size = totalsize(self.mem.read(phys, 8))
        self.fdt_list.append((dirname, Blob(name, phys, size, self.seq)))

    def add_subtree(self, name: str, fdt_phys: int, size: int | None = None) -> None:
        """kho_add_subtree: a child NAME { fdt = <phys> } in the root FDT, and its debugfs blob."""
        if self.profile.fdt_at_boot:
            self._add_subtree_in_place(name, fdt_phys, size)
            return
        sw = self._sw
        sw.begin_node(name)
        sw.property(PROP_SUB_FDT, u64(fdt_phys))
        sw.end_node()
        self._debugfs_add("sub_fdts", name, fdt_phys)

    def _open_root(self) -> bytearray:
        """fdt_open_into(root, root, PAGE_SIZE) on the page's own bytes."""
        buf = bytearray(self.mem.read(self.fdt_page, PAGE_SIZE))
        if libfdt.fdt_open_into(buf, buf, PAGE_SIZE) < 0:
            raise KernelError(errno.ENOMEM, "the root FDT cannot be opened")
        return buf

    def _add_subtree_in_place(self, name: str, phys: int, size: int | None) -> None:
        """6.19+: edit the live root FDT with libfdt; children end up newest first."""
        buf = bytearray(self.mem.read(self.fdt_page, PAGE_SIZE))
        err = add_subtree_in_place(buf, self.profile, name, phys, size)
        if err is None:
            self._debugfs_add("sub_fdts", name, phys, size)
        self.mem.write(self.fdt_page, buf)
        if err is not None:
            raise err

    def remove_subtree(self, phys: int) -> None:
        """kho_remove_subtree: drop the child that points at phys, and its debugfs blob."""
        buf = self._open_root()
        f = libfdt.Fdt(buf)
        off = f.first_subnode(0, (libfdt.NOTFOUND,))
        while off >= 0:
            val = f.getprop(off, self.profile.sub_prop, (libfdt.NOTFOUND,))
            if not isinstance(val, int) and len(val) == 8 and int.from_bytes(val, "little") == phys:
                libfdt.fdt_del_node(buf, off)
                before = len(self.fdt_list)
                self.fdt_list = [(d, b) for d, b in self.fdt_list
                                 if not (d == "sub_fdts" and b.phys == phys)]
                if len(self.fdt_list) != before:
                    self.generation += 1
                break
            off = f.next_subnode(off, (libfdt.NOTFOUND,))
        libfdt.fdt_pack(buf)
        self.mem.write(self.fdt_page, buf)

    def _refresh(self) -> None:
        """6.19 kho_finalize: serialize the map again, swap it into the FDT in place."""
        for p in list(self.producers):
            p.finalize(self)          # only fault injection sits here in 6.19+
        first, chunks = self.track.serialize()
        page = bytearray(self.mem.read(self.fdt_page, PAGE_SIZE))
        off = prop_value_offset(page, 0, PROP_PRESERVED_MEMORY_MAP)
        self.mem.write(self.fdt_page + off, u64(first))
        for c in self.map_chunks:           # kho_update_memory_map frees the previous list
            self.kmalloc.kfree(c)
        self.preserved_mem_map, self.map_chunks = first, chunks

    # -- finalize / abort ---------------------------------------------------
    def _finalize(self) -> None:
        self._sw = sw = PageFdtSw(PAGE_SIZE)
        try:
            sw.finish_reservemap()
            sw.begin_node("")
            sw.property_string("compatible", self.profile.compatible)
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
        """kho_finalize: serialize the map and the producers' subtrees."""
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
        """kho_abort: undo a finalize."""
        try:
            self._abort()
        except KernelError as e:
            self.log(f"KHO: Failed to abort KHO finalization: {-e.errno}")
            raise

    def set_finalize(self, val: int) -> None:
        """kho_out_finalize_set: the write handler of out/finalize."""
        if self.profile.fdt_at_boot:
            # 6.19: any nonzero value refreshes the map; 0 is always EINVAL.
            if not val:
                raise KernelError(errno.EINVAL, "KHO finalization cannot be undone in this ABI")
            self._refresh()
            self.finalized = True
            return
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
        """The debugfs blobs of one directory ("out" or "sub_fdts")."""
        return [b for d, b in self.fdt_list if d == dirname]

    def root_fdt(self) -> bytes:
        """The root FDT's bytes as its page holds them now."""
        return self.mem.read(self.fdt_page, totalsize(self.mem.read(self.fdt_page, 8)))
