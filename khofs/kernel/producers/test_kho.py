"""A counterpart of the kernel's KHO test module (lib/test_kho.c, notifier-era version).

Cold boot: allocate folios of random order, fill them with random bytes, checksum them and
preserve them; at finalize, preserve the sub-FDT page and add subtree "kho_test". After a
kexec: restore each folio, recompute the checksum and log the outcome.
"""

import os
import random
import struct

from ..errors import KernelError
from ..fdt import PageFdtSw, getprop, node_check_compatible, subnodes, totalsize
from ..kho import KhoOut, Producer
from ..physmem import PAGE_SHIFT, PAGE_SIZE, RangeSet

KHO_TEST_MAGIC = 0x4B484F21
KHO_TEST_FDT = "kho_test"
KHO_TEST_COMPAT = "kho-test-v1"
NR_PAGE_ORDERS = 11
MAX_MEM = (PAGE_SIZE << (NR_PAGE_ORDERS - 1)) * 2
PREFIX = "test_kho: "


def csum_partial(data: bytes) -> int:
    """A 32-bit ones'-complement sum of 16-bit words (generic lib/checksum.c style)."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"<{len(data) // 2}H", data))
    while s >> 32:
        s = (s & 0xFFFFFFFF) + (s >> 32)
    return s


class TestKho(Producer):
    name = KHO_TEST_FDT

    def __init__(self, kho: KhoOut, seed: int | None = None, max_mem: int = MAX_MEM):
        rng = random.Random(seed)
        self.folios = []
        total = 0
        while True:
            order = rng.randrange(NR_PAGE_ORDERS)
            size = PAGE_SIZE << order
            if total + size > max_mem:
                break
            phys = kho.pages.alloc_pages(order)
            kho.mem.write(phys, os.urandom(size) if seed is None else rng.randbytes(size))
            self.folios.append((phys, order))
            total += size
        csum = 0
        for phys, order in self.folios:
            csum = _fold_add(csum, csum_partial(kho.mem.read(phys, PAGE_SIZE << order)))
        for phys, order in self.folios:
            kho.preserve_folio(phys, order)
        info = b"".join(struct.pack("<Q", phys | order) for phys, order in self.folios)
        need = len(info) + PAGE_SIZE
        self.fdt_order = max(0, (need - 1).bit_length() - PAGE_SHIFT)
        self.fdt_phys = kho.pages.alloc_pages(self.fdt_order)
        sw = PageFdtSw(PAGE_SIZE << self.fdt_order)
        sw.finish_reservemap()
        sw.begin_node("")
        sw.property("compatible", KHO_TEST_COMPAT.encode() + b"\0")
        sw.property("magic", struct.pack("<I", KHO_TEST_MAGIC))
        sw.begin_node("data")
        sw.property("nr_folios", struct.pack("<I", len(self.folios)))
        sw.property("folios_info", info)
        sw.property("csum", struct.pack("<I", csum))
        sw.end_node()
        sw.end_node()
        kho.mem.write(self.fdt_phys, sw.finish())

    def finalize(self, kho: KhoOut) -> None:
        kho.preserve_folio(self.fdt_phys, self.fdt_order)
        kho.add_subtree(KHO_TEST_FDT, self.fdt_phys)


def _fold_add(a: int, b: int) -> int:
    s = a + b
    return (s & 0xFFFFFFFF) + (s >> 32)


def restore(mem, fdt_phys: int, runs) -> bool:
    """The module's restore path: True iff every check passes."""
    size = totalsize(mem.read(fdt_phys, 8))
    if not 0 < size <= 64 * PAGE_SIZE or fdt_phys + size > mem.size:
        return False
    fdt = mem.read(fdt_phys, size)
    if node_check_compatible(fdt, 0, KHO_TEST_COMPAT) != 0:
        return False
    magic = getprop(fdt, 0, "magic")
    if magic is None or len(magic) != 4 or struct.unpack("<I", magic)[0] != KHO_TEST_MAGIC:
        return False
    data = dict(subnodes(fdt, 0)).get("data")
    if data is None:
        return False
    nr, info, csum = (getprop(fdt, data, p) for p in ("nr_folios", "folios_info", "csum"))
    if nr is None or len(nr) != 4 or csum is None or len(csum) != 4 or info is None:
        return False
    nr = struct.unpack("<I", nr)[0]
    if len(info) != nr * 8:
        return False
    by_order: dict[int, RangeSet] = {}
    for o, p0, sz in runs:
        by_order.setdefault(o, RangeSet()).add(p0, p0 + sz)
    total = 0
    for (val,) in struct.iter_unpack("<Q", info):
        phys, order = val & ~(PAGE_SIZE - 1), val & (PAGE_SIZE - 1)
        rs = by_order.get(order)
        # kho_restore_folio fails unless this very folio was preserved with this order.
        if rs is None or not rs.contains(phys, phys + (PAGE_SIZE << order)):
            return False
        total = _fold_add(total, csum_partial(mem.read(phys, PAGE_SIZE << order)))
    return total == struct.unpack("<I", csum)[0]
