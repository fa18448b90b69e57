"""A counterpart of the kernel's KHO test module (lib/test_kho.c, notifier-era versions).

Cold boot: allocate folios of random order up to max_mem, fill them with random bytes,
checksum them and preserve them; at finalize, preserve the sub-FDT folio and add subtree
"kho_test". After a kexec: restore each folio, recompute the checksum and log the outcome.
In the 6.18 profile `folios_info` is a struct kho_vmalloc describing a preserved vmalloc
area that holds the phys|order list; in 6.16 the list is inline (the 6.17 module's form).
"""

import os
import random
import struct

from ..errors import KernelError
from ..fdt import PageFdtSw, getprop, node_check_compatible, subnodes, totalsize
from ..kho import KhoOut, Producer
from ..physmem import PAGE_SHIFT, PAGE_SIZE, RangeSet

KHO_VMALLOC = struct.Struct("<QIHH")          # first chunk, total_pages, flags, order
KHO_VMALLOC_ALLOC = 0x1
KHO_VMALLOC_SIZE = (PAGE_SIZE - 8) // 8       # phys entries per kho_vmalloc_chunk

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
    """The KHO test module (lib/test_kho.c): random folios and their subtree."""
    name = KHO_TEST_FDT

    def __init__(self, kho: KhoOut, seed: int | None = None, max_mem: int = MAX_MEM):
        rng = random.Random(seed)
        self.folios = []
        total = 0
        while total < max_mem:
            order = rng.randrange(NR_PAGE_ORDERS)
            if total + (PAGE_SIZE << order) > max_mem:
                # get_order() rounds up: take one order less so max_mem is never passed.
                order = max(0, (max_mem - total - 1).bit_length() - PAGE_SHIFT - 1)
            size = PAGE_SIZE << order
            phys = kho.pages.alloc_pages(order)
            kho.mem.write(phys, os.urandom(size) if seed is None else rng.randbytes(size))
            self.folios.append((phys, order))
            total += size
        csum = 0
        for phys, order in self.folios:
            csum = _fold_add(csum, csum_partial(kho.mem.read(phys, PAGE_SIZE << order)))
        info = b"".join(struct.pack("<Q", phys | order) for phys, order in self.folios)
        if kho.profile.vmalloc_folios_info:
            folios_info = preserve_vmalloc(kho, info)
        else:
            folios_info = info
        for phys, order in self.folios:
            kho.preserve_folio(phys, order)
        fdt_size = len(self.folios) * 8 + PAGE_SIZE
        self.fdt_order = max(0, (fdt_size - 1).bit_length() - PAGE_SHIFT)
        self.fdt_phys = kho.pages.alloc_pages(self.fdt_order)
        sw = PageFdtSw(fdt_size)
        sw.finish_reservemap()
        sw.begin_node("")
        sw.property("compatible", KHO_TEST_COMPAT.encode() + b"\0")
        sw.property("magic", struct.pack("<I", KHO_TEST_MAGIC))
        sw.begin_node("data")
        sw.property("nr_folios", struct.pack("<I", len(self.folios)))
        sw.property("folios_info", folios_info)
        sw.property("csum", struct.pack("<I", csum))
        sw.end_node()
        sw.end_node()
        kho.mem.write(self.fdt_phys, sw.finish())

    def init_subtree(self, kho: KhoOut) -> None:
        """6.19+ module init: preserve the FDT folio and add the subtree at once."""
        kho.preserve_folio(self.fdt_phys, self.fdt_order)
        kho.add_subtree(KHO_TEST_FDT, self.fdt_phys, totalsize(kho.mem.read(self.fdt_phys, 8)))

    def finalize(self, kho: KhoOut) -> None:
        """Preserve the test FDT and folios and add the kho_test subtree."""
        try:
            kho.preserve_folio(self.fdt_phys, self.fdt_order)
            kho.add_subtree(KHO_TEST_FDT, self.fdt_phys)
        except KernelError:
            # The module's notifier answers NOTIFY_BAD, which reads back as -EPERM.
            raise KernelError(1, "test_kho: preparing the handover failed") from None


def preserve_vmalloc(kho: KhoOut, data: bytes) -> bytes:
    """vmalloc `data` (order-0 pages) and kho_preserve_vmalloc it: the struct kho_vmalloc."""
    nr_pages = max(1, (len(data) + PAGE_SIZE - 1) // PAGE_SIZE)
    pages = [kho.pages.alloc_pages(0) for _ in range(nr_pages)]
    chunks = []

    def new_chunk():
        c = kho.pages.alloc_pages(0)
        kho.preserve_pages(c, PAGE_SIZE)
        if chunks:
            kho.mem.write(chunks[-1], struct.pack("<Q", c))
        chunks.append(c)
        return c

    chunk, idx = new_chunk(), 0
    for page in pages:
        kho.preserve_pages(page, PAGE_SIZE)
        kho.mem.write(chunk + 8 + 8 * idx, struct.pack("<Q", page))
        idx += 1
        if idx == KHO_VMALLOC_SIZE:
            chunk, idx = new_chunk(), 0
    for i, page in enumerate(pages):
        kho.mem.write(page, data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
    return KHO_VMALLOC.pack(chunks[0], nr_pages, KHO_VMALLOC_ALLOC, 0)


def restore_vmalloc(mem, desc: bytes, preserved) -> bytes | None:
    """kho_restore_vmalloc: the area's bytes, or None if a page was not preserved."""
    first, total, flags, order = KHO_VMALLOC.unpack(desc)
    out = bytearray()
    chunk, seen = first, 0
    while chunk and len(out) < total * PAGE_SIZE and seen < 1 << 16:
        seen += 1
        if not preserved(chunk, 0) or chunk + PAGE_SIZE > mem.size:
            return None
        page = mem.read(chunk, PAGE_SIZE)
        for i in range(KHO_VMALLOC_SIZE):
            phys = struct.unpack_from("<Q", page, 8 + 8 * i)[0]
            if not phys or len(out) >= total * PAGE_SIZE:
                break
            if not preserved(phys, order) or phys + (PAGE_SIZE << order) > mem.size:
                return None
            out += mem.read(phys, PAGE_SIZE << order)
        chunk = struct.unpack_from("<Q", page, 0)[0]
    return bytes(out) if len(out) >= total * PAGE_SIZE else None


def _fold_add(a: int, b: int) -> int:
    s = a + b
    return (s & 0xFFFFFFFF) + (s >> 32)


def restore(mem, fdt_phys: int, runs) -> bool:
    """The module's restore path: True iff every check passes."""
    if fdt_phys + 8 > mem.size:
        return False
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
    by_order: dict[int, RangeSet] = {}
    for o, p0, sz in runs:
        by_order.setdefault(o, RangeSet()).add(p0, p0 + sz)

    def preserved(phys, order):
        rs = by_order.get(order)
        return rs is not None and rs.contains(phys, phys + (PAGE_SIZE << order))

    if len(info) == KHO_VMALLOC.size and nr * 8 != KHO_VMALLOC.size:
        info = restore_vmalloc(mem, info, preserved)
        if info is None:
            return False
        info = info[:nr * 8]
    if len(info) != nr * 8:
        return False
    total = 0
    for (val,) in struct.iter_unpack("<Q", info):
        phys, order = val & ~(PAGE_SIZE - 1), val & (PAGE_SIZE - 1)
        # kho_restore_folio fails unless this very folio was preserved with this order.
        if not preserved(phys, order):
            return False
        total = _fold_add(total, csum_partial(mem.read(phys, PAGE_SIZE << order)))
    return total == struct.unpack("<I", csum)[0]
