"""The preservation tracker and the khoser_mem_chunk list (KHO-SPEC §5, facts Q4-Q5)."""

import struct

import pytest
from hypothesis import given, settings, strategies as st

from khofs.kernel.errors import KernelError
from khofs.kernel.memtrack import MapError, MemTracker, walk_memory_map
from khofs.kernel.physmem import Kmalloc, Memblock, PageAllocator, PhysMem
from khofs.kernel.profile import PROFILES

PAGE = 4096
BITS_618 = PROFILES["6.18"].preserve_bits
BITS_616 = PROFILES["6.16"].preserve_bits
HDR = struct.Struct("<QII")
ELM = struct.Struct("<QQ")


class Env:
    def __init__(self, bits, memory=1 << 30):
        self.mem = PhysMem(memory)
        self.pages = PageAllocator(self.mem, Memblock(self.mem))
        self.kmalloc = Kmalloc(self.pages)
        self.track = MemTracker(self.mem, self.kmalloc, bits)
        self.bits = bits

    def chunks(self, first):
        """[(phys, next, order, num_elms, [(phys_start, bitmap_phys), ...])] following next."""
        out = []
        phys = first
        while phys:
            page = self.mem.read(phys, PAGE)
            nxt, order, num = HDR.unpack_from(page)
            elms = [ELM.unpack_from(page, 16 + 16 * i) for i in range(min(num, 255))]
            out.append((phys, nxt, order, num, elms))
            phys = nxt
        return out

    def bitmap(self, phys):
        return self.mem.read(phys, self.bits // 8)

    def blocks(self, first):
        """{(order, phys)} of every preserved block the next kernel finds."""
        out = set()
        for order, phys, size in walk_memory_map(self.mem, first, self.bits):
            bs = PAGE << order
            assert phys % bs == 0 and size % bs == 0
            out.update((order, p) for p in range(phys, phys + size, bs))
        return out


def bit_is_set(bm: bytes, b: int) -> bool:
    # Linux layout: bit b is bit b % 64 of u64 word b / 64.
    word = struct.unpack_from("<Q", bm, 8 * (b // 64))[0]
    return bool(word >> (b % 64) & 1)


def set_bits(bm: bytes):
    return [i for i in range(len(bm) * 8) if bm[i >> 3] >> (i & 7) & 1]


def greedy(pfn, nr):
    """kho_preserve_pages' split: order = min(ctz(pfn), ilog2(remaining))."""
    out = []
    end = pfn + nr
    while pfn < end:
        ctz = (pfn & -pfn).bit_length() - 1 if pfn else 64
        order = min(ctz, (end - pfn).bit_length() - 1)
        out.append((order, pfn * PAGE))
        pfn += 1 << order
    return out


# -- the worked example: preserve 0x1003000 + 0x5000 -------------------------------------------

def test_example_split():
    assert greedy(0x1003, 5) == [(0, 0x1003000), (2, 0x1004000)]
    env = Env(BITS_618)
    env.track.preserve_pages(0x1003, 5)
    first, _ = env.track.serialize()
    assert env.blocks(first) == {(0, 0x1003000), (2, 0x1004000)}
    assert list(walk_memory_map(env.mem, first, env.bits)) == [
        (0, 0x1003000, 0x1000), (2, 0x1004000, 0x4000)]
    assert env.track.preserved_bytes() == 0x5000


def test_example_bitmaps_6_18():
    env = Env(BITS_618)
    env.track.preserve_pages(0x1003, 5)
    first, chunks = env.track.serialize()
    (c0, c2) = env.chunks(first)
    assert [c[0] for c in (c0, c2)] == chunks
    assert (c0[2], c0[3]) == (0, 1)
    assert (c2[2], c2[3]) == (2, 1)
    (start0, bm0), = c0[4]
    (start2, bm2), = c2[4]
    assert start0 == 0 and start2 == 0
    assert set_bits(env.bitmap(bm0)) == [0x1003]
    assert bit_is_set(env.bitmap(bm0), 0x1003)
    assert set_bits(env.bitmap(bm2)) == [1025]      # pfn 0x1004 >> 2 = 0x401
    assert len(env.bitmap(bm0)) == 4096


def test_example_bitmaps_6_16():
    env = Env(BITS_616)
    env.track.preserve_pages(0x1003, 5)
    first, _ = env.track.serialize()
    (c0, c2) = env.chunks(first)
    (start0, bm0), = c0[4]
    (start2, bm2), = c2[4]
    assert start0 == 0x1000000        # bitmap index 1 of order 0: (1 * 4096) << 12
    assert set_bits(env.bitmap(bm0)) == [3]
    assert start2 == 0
    assert set_bits(env.bitmap(bm2)) == [1025]
    assert bit_is_set(env.bitmap(bm2), 1025)
    assert len(env.bitmap(bm0)) == 512


# -- chunk layout ------------------------------------------------------------------------------------

def test_chunk_byte_layout():
    env = Env(BITS_618)
    env.track.preserve_blocks(0x200, 1, 0)
    env.track.preserve_blocks(3 * BITS_618, 1, 0)     # bitmap index 3
    first, chunks = env.track.serialize()
    assert chunks == [first]
    page = env.mem.read(first, PAGE)
    nxt, order, num = struct.unpack_from("<QII", page, 0)
    assert (nxt, order, num) == (0, 0, 2)
    e0 = struct.unpack_from("<QQ", page, 16)
    e1 = struct.unpack_from("<QQ", page, 32)
    assert e0[0] == 0
    assert e1[0] == (3 * BITS_618) << 12
    assert set_bits(env.bitmap(e0[1])) == [0x200]
    assert set_bits(env.bitmap(e1[1])) == [0]
    assert page[48:] == bytes(PAGE - 48)          # unused entries stay zero


def test_new_chunk_per_order_ascending():
    env = Env(BITS_618)
    env.track.preserve_blocks(0x800, 1, 3)
    env.track.preserve_blocks(0x10, 1, 0)
    env.track.preserve_blocks(0x400, 1, 1)
    first, chunks = env.track.serialize()
    cs = env.chunks(first)
    assert [c[2] for c in cs] == [0, 1, 3]
    assert [c[3] for c in cs] == [1, 1, 1]
    assert [c[1] for c in cs] == chunks[1:] + [0]        # linked in creation order
    assert env.blocks(first) == {(0, 0x10000), (1, 0x400000), (3, 0x800000)}


def test_more_than_255_bitmaps_link_a_second_chunk():
    env = Env(BITS_616, memory=8 << 30)
    for k in range(256):
        env.track.preserve_blocks(k * BITS_616 + k, 1, 0)
    first, chunks = env.track.serialize()
    cs = env.chunks(first)
    assert len(cs) == 2 == len(chunks)
    (p0, n0, o0, num0, elms0), (p1, n1, o1, num1, elms1) = cs
    assert (n0, o0, num0) == (p1, 0, 255)
    assert (n1, o1, num1) == (0, 0, 1)
    assert [s for s, _ in elms0] == [(k * BITS_616) << 12 for k in range(255)]
    assert elms1[0][0] == (255 * BITS_616) << 12
    assert set_bits(env.bitmap(elms1[0][1])) == [255]
    assert len(env.blocks(first)) == 256


# -- round trips -------------------------------------------------------------------------------------

ranges = st.lists(st.tuples(st.integers(0, 1 << 17), st.integers(1, 80)), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(ranges, st.sampled_from([BITS_618, BITS_616]))
def test_walk_reconstructs_preserved_pages(rs, bits):
    env = Env(bits)
    expected_blocks = set()
    expected_pages = set()
    for pfn, nr in rs:
        env.track.preserve_pages(pfn, nr)
        expected_blocks.update(greedy(pfn, nr))
        expected_pages.update(range(pfn, pfn + nr))
    first, _ = env.track.serialize()
    got = env.blocks(first)
    assert got == expected_blocks
    pages = set()
    for order, phys in got:
        pages.update(range(phys // PAGE, phys // PAGE + (1 << order)))
    assert pages == expected_pages


@settings(max_examples=40, deadline=None)
@given(ranges, st.data())
def test_unpreserve_subset(rs, data):
    env = Env(BITS_618)
    for pfn, nr in rs:
        env.track.preserve_pages(pfn, nr)
    drop = data.draw(st.lists(st.sampled_from(rs), unique=True))
    for pfn, nr in drop:
        env.track.unpreserve_pages(pfn, nr)
    expected = set()
    for pfn, nr in rs:
        expected.update(greedy(pfn, nr))
    for pfn, nr in drop:
        expected.difference_update(greedy(pfn, nr))
    first, _ = env.track.serialize()
    assert env.blocks(first) == expected


def test_unpreserve_keeps_empty_bitmaps():
    env = Env(BITS_618)
    env.track.preserve_blocks(0x4000, 1, 2)
    bm = env.track.orders[2][0x1000 // BITS_618]
    env.track.unpreserve_blocks(0x4000, 1, 2)
    first, _ = env.track.serialize()
    (c,) = env.chunks(first)
    assert (c[2], c[3]) == (2, 1)
    assert c[4] == [(0, bm)]
    assert env.bitmap(bm) == bytes(4096)
    assert env.blocks(first) == set()


def test_bulk_folios_equal_single_folios():
    a, b = Env(BITS_616), Env(BITS_616)
    # order-1 blocks 4000..9000 straddle bitmap boundaries of 4096 bits
    a.track.preserve_blocks(2 * 4000, 5000, 1)
    for i in range(4000, 9000):
        b.track.preserve_blocks(2 * i, 1, 1)
    assert sorted(a.track.orders[1]) == sorted(b.track.orders[1]) == [0, 1, 2]
    for idx in a.track.orders[1]:
        assert a.bitmap(a.track.orders[1][idx]) == b.bitmap(b.track.orders[1][idx])
    fa, _ = a.track.serialize()
    assert a.blocks(fa) == {(1, 2 * i * PAGE) for i in range(4000, 9000)}


def test_misaligned_folio_rejected():
    env = Env(BITS_618)
    with pytest.raises(KernelError):
        env.track.preserve_blocks(0x1001, 1, 1)
    assert env.blocks(env.track.serialize()[0]) == set()


def test_preserving_twice_is_idempotent():
    env = Env(BITS_618)
    env.track.preserve_pages(0x100, 3)
    env.track.preserve_pages(0x100, 3)
    assert env.track.preserved_bytes() == 3 * PAGE


def test_pfn_zero_split():
    env = Env(BITS_618)
    env.track.preserve_pages(0, 7)
    first, _ = env.track.serialize()
    assert env.blocks(first) == {(2, 0), (1, 0x4000), (0, 0x6000)}


def test_destroy_frees_bitmaps():
    env = Env(BITS_618)
    env.track.preserve_pages(0x1003, 5)
    env.track.preserve_blocks(5 * BITS_618, 1, 0)
    bitmaps = [b for physxa in env.track.orders.values() for b in physxa.values()]
    assert len(bitmaps) == 3
    for b in bitmaps:
        assert env.pages.used.overlaps(b, b + 1)
    env.track.destroy()
    assert env.track.orders == {}
    for b in bitmaps:
        assert not env.pages.used.overlaps(b, b + 1)
        assert b not in env.kmalloc.obj_size
    assert env.track.serialize() == (0, [])
    assert env.track.preserved_bytes() == 0


class FailingKmalloc(Kmalloc):
    def __init__(self, pages, ok):
        super().__init__(pages)
        self.ok = ok

    def kzalloc(self, size):
        if self.ok == 0:
            raise KernelError(12, "out of memory")
        self.ok -= 1
        return super().kzalloc(size)


def test_failed_preserve_clears_bits_set_so_far():
    env = Env(BITS_616)
    env.kmalloc = FailingKmalloc(env.pages, 1)
    env.track = MemTracker(env.mem, env.kmalloc, BITS_616)
    # pfn 4095 (order 0, bitmap 0) then pfn 4096.. (order 12, a new physxa and bitmap: fails)
    with pytest.raises(KernelError):
        env.track.preserve_pages(4095, 1 + 4096)
    assert env.track.preserved_bytes() == 0
    assert list(env.track.orders[0]) == [0]          # the bitmap itself is kept
    env.kmalloc.ok = 10
    first, _ = env.track.serialize()
    # The order-12 physxa was created before its bitmap failed: an empty chunk.
    assert [(c[2], c[3]) for c in env.chunks(first)] == [(0, 1), (12, 0)]


# -- the reader's errors ---------------------------------------------------------------------------

def test_walk_detects_chunk_loop():
    env = Env(BITS_618)
    c = env.pages.alloc_pages(0)
    env.mem.write(c, HDR.pack(c, 0, 0))
    with pytest.raises(MapError):
        list(walk_memory_map(env.mem, c, BITS_618))


def test_walk_rejects_too_many_elements():
    env = Env(BITS_618)
    c = env.pages.alloc_pages(0)
    env.mem.write(c, HDR.pack(0, 0, 256))
    with pytest.raises(MapError):
        list(walk_memory_map(env.mem, c, BITS_618))


def test_walk_accepts_255_elements():
    env = Env(BITS_618)
    c = env.pages.alloc_pages(0)
    bm = env.pages.alloc_pages(0)
    env.mem.write(c, HDR.pack(0, 0, 255) + b"".join(ELM.pack(i * BITS_618 * PAGE, bm)
                                                       for i in range(255)))
    env.mem.write(bm, b"\x01")
    assert len(list(walk_memory_map(env.mem, c, BITS_618))) == 255


def test_walk_empty_map():
    env = Env(BITS_618)
    assert list(walk_memory_map(env.mem, 0, BITS_618)) == []


def test_orders_are_not_capped_at_max_page_order():
    env = Env(BITS_618, memory=4 << 30)
    env.track.preserve_pages(0x40000, 0x40000)        # 1 GiB at 1 GiB: one order-18 block
    first, _ = env.track.serialize()
    assert env.blocks(first) == {(18, 1 << 30)}
