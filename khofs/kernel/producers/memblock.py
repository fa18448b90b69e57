"""memblock's reserve_mem= regions and their KHO producer (sub-FDT "memblock")."""

import errno
from dataclasses import dataclass

from ..errors import KernelError
from ..fdt import PageFdtSw, totalsize, u64
from ..kho import KhoOut, Producer
from ..cmdline import cmdline_bytes, kisspace
from ..kstrtox import memparse
from ..physmem import PAGE_SHIFT, PAGE_SIZE, SMP_CACHE_BYTES, Memblock

RESERVE_MEM_MAX_ENTRIES = 8
RESERVE_MEM_NAME_SIZE = 16
MEMBLOCK_KHO_FDT = "memblock"
MEMBLOCK_KHO_NODE_COMPATIBLE = "memblock-v1"
RESERVE_MEM_KHO_NODE_COMPATIBLE = "reserve-mem-v1"


@dataclass
class ReserveMem:
    """One reserve_mem= region."""
    name: str
    start: int
    size: int
    align: int


def parse_reserve_mem(val, table: list, memblock: Memblock, revive=None) -> ReserveMem:
    """The reserve_mem= parameter: SIZE:ALIGN:NAME, allocated at once (top-down)."""
    if val is None:
        raise KernelError(errno.EINVAL, "reserve_mem needs a value")
    if len(table) >= RESERVE_MEM_MAX_ENTRIES:
        raise KernelError(errno.EBUSY, f"at most {RESERVE_MEM_MAX_ENTRIES} reserve_mem entries")
    p = cmdline_bytes(val)
    size, n = memparse(p)
    if not size or n == 0:
        raise KernelError(errno.EINVAL, "size is missing or zero")
    if p[n:n + 1] != b":":
        raise KernelError(errno.EINVAL, "expected ':' after the size")
    align, m = memparse(p[n + 1:])
    pos = n + 1 + m
    if p[pos:pos + 1] != b":":
        raise KernelError(errno.EINVAL, "expected ':' after the alignment")
    align = max(align, SMP_CACHE_BYTES)
    name = p[pos + 1:].decode(errors="replace")
    if not name or len(p[pos + 1:]) >= RESERVE_MEM_NAME_SIZE:
        raise KernelError(errno.EINVAL, f"name must be 1 to {RESERVE_MEM_NAME_SIZE - 1} characters")
    if all(kisspace(c) for c in p[pos + 1:]):
        raise KernelError(errno.EINVAL, "name is blank")
    if any(r.name == name for r in table):
        raise KernelError(errno.EBUSY, f"name {name!r} is already used")
    if revive is not None:
        found = revive(name, size, align)
        if found is not None:
            table.append(found)
            return found
    start = memblock.phys_alloc(size, align)
    if not start:
        raise KernelError(errno.ENOMEM, f"cannot allocate {size:#x} bytes")
    r = ReserveMem(name, start, size, align)
    table.append(r)
    return r


class MemblockProducer(Producer):
    """reserve_mem_init + the KEXEC_KHO_FINALIZE notifier of mm/memblock.c."""

    name = MEMBLOCK_KHO_FDT

    def __init__(self, kho: KhoOut, table: list):
        self.table = table
        self.fdt_page = kho.pages.alloc_pages(0)
        sw = PageFdtSw(PAGE_SIZE)
        sw.finish_reservemap()
        sw.begin_node("")
        sw.property_string("compatible", MEMBLOCK_KHO_NODE_COMPATIBLE)
        for r in table:
            sw.begin_node(r.name)
            sw.property_string("compatible", RESERVE_MEM_KHO_NODE_COMPATIBLE)
            sw.property("start", u64(r.start))
            sw.property("size", u64(r.size))
            sw.end_node()
        sw.end_node()
        kho.mem.write(self.fdt_page, sw.finish())

    def init_subtree(self, kho: KhoOut) -> None:
        """6.19+ reserve_mem_init: preserve the FDT page, add the subtree, preserve regions."""
        kho.preserve_folio(self.fdt_page, 0)
        kho.add_subtree(MEMBLOCK_KHO_FDT, self.fdt_page,
                        totalsize(kho.mem.read(self.fdt_page, 8)))
        for r in self.table:
            kho.preserve_pfns(r.start >> PAGE_SHIFT, r.size >> PAGE_SHIFT)

    def finalize(self, kho: KhoOut) -> None:
        """Preserve each reserve_mem region and add the memblock subtree."""
        # The kernel ORs the errors of these calls together.
        err = 0
        for r in self.table:
            try:
                if kho.profile.preserve_phys:
                    kho.preserve_pages(r.start, r.size)             # kho_preserve_phys
                else:
                    # kho_preserve_pages(phys_to_page(start), size >> PAGE_SHIFT)
                    kho.preserve_pfns(r.start >> PAGE_SHIFT, r.size >> PAGE_SHIFT)
            except KernelError as e:
                err |= -e.errno
        try:
            kho.preserve_folio(self.fdt_page, 0)
        except KernelError as e:
            err |= -e.errno
        try:
            kho.add_subtree(MEMBLOCK_KHO_FDT, self.fdt_page)
        except KernelError as e:
            err |= -e.errno
        if err:
            raise KernelError(-err, "memblock: preserving reserve_mem regions failed")
