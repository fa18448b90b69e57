"""kho_out: finalize/abort, preservation while finalized, producers (KHO-SPEC §2, §4, §10; facts Q6)."""

import errno

import pytest

from khofs.kernel.errors import KernelError
from khofs.kernel.fdt import getprop, subnodes, totalsize
from khofs.kernel.kho import Producer
from khofs.kernel.machine import Machine, MachineConfig
from khofs.kernel.memtrack import walk_memory_map

G, M = 1 << 30, 1 << 20
PAGE = 4096


def boot(cmdline="kho=on", abi="6.18", **cfg):
    cfg.setdefault("memory", G)
    return Machine(cmdline, MachineConfig(abi=abi, **cfg))


def errno_of(fn, *args):
    with pytest.raises(KernelError) as ei:
        fn(*args)
    return ei.value.errno


def free_page(m):
    return m.kho_out.pages.alloc_pages(0)


def texts(m):
    return [line.text for line in m.dmesg]


def runs(m):
    return list(walk_memory_map(m.mem, m.kho_out.preserved_mem_map, m.profile.preserve_bits))


class Recorder(Producer):
    def __init__(self, name="rec", fail_finalize=0, fail_abort=0, subtree=None):
        self.name = name
        self.calls = []
        self.fail_finalize, self.fail_abort = fail_finalize, fail_abort
        self.subtree = subtree

    def finalize(self, kho):
        self.calls.append("finalize")
        if self.subtree is not None:
            kho.add_subtree(self.name, self.subtree)
        if self.fail_finalize:
            raise KernelError(self.fail_finalize)

    def abort(self, kho):
        self.calls.append("abort")
        if self.fail_abort:
            raise KernelError(self.fail_abort)


# -- state machine ------------------------------------------------------------------------------

def test_finalize_then_abort():
    m = boot()
    out = m.kho_out
    assert out.finalized is False
    out.set_finalize(1)
    assert out.finalized is True
    assert errno_of(out.set_finalize, 1) == errno.EEXIST
    assert errno_of(out.set_finalize, 7) == errno.EEXIST
    out.set_finalize(0)
    assert out.finalized is False
    assert errno_of(out.set_finalize, 0) == errno.ENOENT


def test_abort_when_not_finalized_is_enoent():
    assert errno_of(boot().kho_out.set_finalize, 0) == errno.ENOENT


def test_any_nonzero_value_finalizes():
    m = boot()
    m.kho_out.set_finalize(1 << 63)
    assert m.kho_out.finalized is True


def test_preserve_while_finalized_is_ebusy():
    m = boot()
    out = m.kho_out
    phys = free_page(m)
    out.set_finalize(1)
    assert errno_of(out.preserve_folio, phys, 0) == errno.EBUSY
    assert errno_of(out.preserve_pages, phys, PAGE) == errno.EBUSY
    assert errno_of(out.preserve_pfns, phys // PAGE, 1) == errno.EBUSY
    assert errno_of(out.preserve_folios, phys, 1, 0) == errno.EBUSY
    assert not out.track.is_preserved(phys, 0)
    out.set_finalize(0)
    out.preserve_folio(phys, 0)
    assert out.track.is_preserved(phys, 0)


def test_6_16_ebusy_comes_before_alignment_check():
    m = boot(abi="6.16")
    m.kho_out.set_finalize(1)
    assert errno_of(m.kho_out.preserve_pages, 0x1001, PAGE) == errno.EBUSY


def test_6_16_preserve_phys_needs_page_alignment():
    m = boot(abi="6.16")
    assert errno_of(m.kho_out.preserve_pages, free_page(m) + 1, PAGE) == errno.EINVAL


def test_abort_forgets_every_preservation():
    m = boot()
    out = m.kho_out
    before = free_page(m)
    out.preserve_pages(before, PAGE)
    out.set_finalize(1)
    assert out.track.is_preserved(before, 0)
    out.set_finalize(0)
    assert not out.track.is_preserved(before, 0)
    assert out.track.preserved_bytes() == 0
    assert out.preserved_mem_map == 0
    out.set_finalize(1)
    # only the root FDT page is left in the map
    assert runs(m) == [(0, out.fdt_page, PAGE)]


def test_abort_frees_the_serialized_map():
    m = boot()
    out = m.kho_out
    out.set_finalize(1)
    chunks = list(out.map_chunks)
    assert chunks and out.preserved_mem_map == chunks[0]
    out.set_finalize(0)
    for c in chunks:
        assert not out.pages.used.overlaps(c, c + PAGE)


# -- producers ----------------------------------------------------------------------------------

def test_producers_called_in_registration_order():
    m = boot()
    out = m.kho_out
    order = []

    class P(Producer):
        def __init__(self, tag):
            self.tag = tag

        def finalize(self, kho):
            order.append(self.tag)

    out.register_notifier(P("a"))
    out.register_notifier(P("b"))
    out.set_finalize(1)
    assert order == ["a", "b"]


def test_failing_producer_fails_finalize():
    m = boot()
    out = m.kho_out
    rec = Recorder(fail_finalize=errno.ENOMEM)
    out.register_notifier(rec)
    kept = free_page(m)
    out.preserve_folio(kept, 0)
    assert errno_of(out.set_finalize, 1) == errno.ENOMEM
    assert out.finalized is False
    assert "KHO: Failed to convert KHO state tree: -12" in texts(m)
    # kho_finalize's error path runs kho_abort: tracker wiped, ABORT notifiers called.
    assert rec.calls == ["finalize", "abort"]
    assert out.track.preserved_bytes() == 0
    assert out.blobs("out") == []
    assert errno_of(out.set_finalize, 0) == errno.ENOENT


def test_failed_finalize_leaves_sub_fdt_entry_and_retry_hits_eexist():
    # kho_add_subtree made the debugfs blob; the failure path never removes it.
    m = boot("kho=on reserve_mem=4M:4K:foo")
    out = m.kho_out
    out.register_notifier(Recorder(fail_finalize=errno.EIO))
    assert errno_of(out.set_finalize, 1) == errno.EIO
    assert [b.name for b in out.blobs("sub_fdts")] == ["memblock"]
    assert out.blobs("out") == []
    assert errno_of(out.set_finalize, 1) == errno.EEXIST
    assert out.finalized is False


def test_failing_abort_keeps_state_1():
    m = boot()
    out = m.kho_out
    rec = Recorder(fail_abort=errno.EBUSY)
    out.register_notifier(rec)
    out.set_finalize(1)
    assert errno_of(out.set_finalize, 0) == errno.EBUSY
    assert out.finalized is True
    assert "KHO: Failed to abort KHO finalization: -16" in texts(m)
    assert [b.name for b in out.blobs("out")] == ["fdt"]
    # the tracker was already freed before the notifiers ran
    assert out.track.preserved_bytes() == 0


# -- debugfs blob list ------------------------------------------------------------------------------

def test_fdt_and_sub_fdts_appear_and_vanish():
    m = boot("kho=on reserve_mem=4M:4K:foo")
    out = m.kho_out
    assert out.fdt_list == []
    out.set_finalize(1)
    (fdt,) = out.blobs("out")
    (sub,) = out.blobs("sub_fdts")
    assert (fdt.name, fdt.phys, fdt.size) == ("fdt", out.fdt_page, 196)
    assert sub.name == "memblock"
    assert sub.size == totalsize(m.mem.read(sub.phys, 8))
    out.set_finalize(0)
    assert out.blobs("out") == [] and out.blobs("sub_fdts") == []
    out.set_finalize(1)
    assert [b.name for b in out.blobs("out")] == ["fdt"]
    assert [b.name for b in out.blobs("sub_fdts")] == ["memblock"]


def test_root_fdt_sizes():
    plain = boot()
    plain.kho_out.set_finalize(1)
    assert len(plain.kho_out.root_fdt()) == 152
    assert plain.kho_out.blobs("out")[0].size == 152
    mb = boot("kho=on reserve_mem=4M:4K:foo")
    mb.kho_out.set_finalize(1)
    assert len(mb.kho_out.root_fdt()) == 196


def test_root_fdt_page_is_preserved_order_0():
    m = boot()
    out = m.kho_out
    out.set_finalize(1)
    assert out.track.is_preserved(out.fdt_page, 0)
    assert (0, out.fdt_page, PAGE) in runs(m)
    assert getprop(out.root_fdt(), 0, "preserved-memory-map") == out.preserved_mem_map.to_bytes(8, "little")


def test_memblock_producer_preserves_regions_and_its_fdt():
    m = boot("kho=on reserve_mem=4M:4K:foo reserve_mem=8K:4K:bar")
    out = m.kho_out
    out.set_finalize(1)
    regions = {r.name: r for r in m.reserve_mem}
    blocks = runs(m)
    covered = set()
    for order, phys, size in blocks:
        covered.update(range(phys, phys + size, PAGE))
    for r in regions.values():
        assert set(range(r.start, r.start + r.size, PAGE)) <= covered
    (sub,) = out.blobs("sub_fdts")
    assert sub.phys in covered
    assert [n for n, _ in subnodes(out.root_fdt())] == ["memblock"]


def test_root_children_in_registration_order():
    m = boot("kho=on reserve_mem=4M:4K:foo")
    out = m.kho_out
    mb = out.producers[0]          # any FDT will do for the sub-FDT: reuse memblock's
    out.register_notifier(Recorder("zzz_late", subtree=mb.fdt_page))
    out.register_notifier(Recorder("aaa_later", subtree=mb.fdt_page))
    out.set_finalize(1)
    assert [n for n, _ in subnodes(out.root_fdt())] == ["memblock", "zzz_late", "aaa_later"]


# -- kexec load: when the handover is attached (§0, §8) -----------------------------------------------

def test_6_18_image_loaded_before_finalize_has_no_handover():
    m = boot()
    img = m.kexec_load()
    assert img.fdt_phys is None
    m.kho_out.set_finalize(1)
    img = m.kexec_load()
    assert img.fdt_phys == m.kho_out.fdt_page
    assert img.scratch_bytes == b"".join(a.to_bytes(8, "little") + s.to_bytes(8, "little")
                                         for a, s in m.scratch)
    assert len(img.scratch_bytes) == 16 * 3


def test_6_16_image_always_carries_the_fdt_page():
    m = boot(abi="6.16")
    img = m.kexec_load()
    assert img.fdt_phys == m.kho_out.fdt_page


# -- memblock producer with a region that is not page aligned (facts Q8) ---------------------------------

def test_6_16_unaligned_reserve_mem_fails_finalize():
    # kho_preserve_phys rejects a range that is not page aligned
    m = boot("kho=on reserve_mem=4097:64:odd", abi="6.16")
    assert errno_of(m.kho_out.set_finalize, 1) == errno.EINVAL
    assert "KHO: Failed to convert KHO state tree: -22" in texts(m)
    assert m.kho_out.finalized is False


def test_6_18_unaligned_reserve_mem_is_truncated_to_whole_pages():
    # kho_preserve_pages(phys_to_page(start), size >> PAGE_SHIFT)
    m = boot("kho=on reserve_mem=4097:64:odd")
    (r,) = m.reserve_mem
    assert r.start % PAGE != 0
    m.kho_out.set_finalize(1)
    first = r.start // PAGE * PAGE
    assert m.kho_out.track.is_preserved(first, 0)
    assert not m.kho_out.track.is_preserved(first + PAGE, 0)


def test_map_chunks_and_bitmaps_are_not_preserved():
    m = boot("kho=on reserve_mem=4M:4K:foo")
    out = m.kho_out
    out.set_finalize(1)
    covered = set()
    for order, phys, size in runs(m):
        covered.update(range(phys, phys + size, PAGE))
    bitmaps = [b for physxa in out.track.orders.values() for b in physxa.values()]
    assert out.map_chunks and bitmaps
    for p in out.map_chunks + bitmaps:
        assert p // PAGE * PAGE not in covered


def test_test_kho_allocates_exactly_max_mem():
    # lib/test_kho.c clamps an overshooting order and loops until alloc_size == max_mem.
    from khofs.kernel.producers.test_kho import MAX_MEM, TestKho
    assert MAX_MEM == 8 << 20
    for seed in range(5):
        m = boot()
        t = TestKho(m.kho_out, seed)
        assert sum(PAGE << order for _, order in t.folios) == MAX_MEM, seed
        for phys, order in t.folios:
            assert m.kho_out.track.is_preserved(phys, order)
