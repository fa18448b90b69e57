"""The 7.0 and 7.1 ABI profiles at the kernel layer (KHO-SPEC §0, §9; notes §3.3-3.5, §4.5,
§5.1-5.4, §6.4-6.6): root FDT bytes, finalize, the radix tree, kexec-metadata, the debugfs
files each kernel shows, and kexec from one release into another."""

import errno
import shutil
import struct
import subprocess

import libfdt
import pytest

from khofs.fs.debugfs import Tree
from khofs.kernel.errors import KernelError
from khofs.kernel.handover import Handover
from khofs.kernel.machine import Machine, MachineConfig
from khofs.kernel.memtrack import MapError
from khofs.kernel.physmem import PAGE_SIZE
from khofs.kernel.producers.user import UserSubtree
from khofs.kernel.radix import (KHO_TREE_MAX_DEPTH, RadixTracker, decode_key, encode_key,
                                table_index, walk_radix_map)

from abi_cross import CROSS

G = 1 << 30
CMDLINE = "kho=on reserve_mem=1M:4096:test_resv khofs.test_kho=1"
PROFILES = ["6.16", "6.18", "7.0", "7.1"]


def boot(abi, cmdline=CMDLINE, memory=G, release=None):
    return Machine(cmdline, MachineConfig(memory=memory, abi=abi, release=release))


def kexec(m, abi=None, release=None, cmdline=None):
    m.kexec_load(cmdline, release, abi)
    ho = m.kexec_exec()
    ho = Handover.loads(ho.dumps())          # what a state directory would hold
    return Machine(ho.cmdline, MachineConfig(**ho.config), ho, release=ho.release)


def texts(m):
    return [line.text for line in m.dmesg if "scratch areas" not in line.text]


def le64(v):
    return struct.pack("<Q", v)


def page_fdt(m):
    return m.mem.read(m.kho_out.fdt_page, PAGE_SIZE)


def children(blob):
    f = libfdt.Fdt(bytearray(blob))
    out, off = [], f.first_subnode(0, (libfdt.NOTFOUND,))
    while off >= 0:
        props, p = [], f.first_property_offset(off, (libfdt.NOTFOUND,))
        while p >= 0:
            prop = f.get_property_by_offset(p)
            props.append((prop.name, bytes(prop)))
            p = f.next_property_offset(p, (libfdt.NOTFOUND,))
        out.append((f.get_name(off), props))
        off = f.next_subnode(off, (libfdt.NOTFOUND,))
    return out


def reference_root(compat, map_phys, adds, blob_size):
    """The kernel's calls through pylibfdt's Fdt methods (a second path to the same bytes):
    kho_out_fdt_setup, then per kho_add_subtree fdt_open_into/add_subnode/setprop/pack."""
    sw = libfdt.FdtSw(PAGE_SIZE)
    sw.finish_reservemap()
    sw.begin_node("")
    sw.property_string("compatible", compat)
    sw.property("preserved-memory-map", le64(map_phys))
    sw.end_node()
    fdt = sw.as_fdt()
    page = bytearray(fdt.as_bytearray()) + bytes(PAGE_SIZE - len(fdt.as_bytearray()))
    for name, phys, size in adds:
        f = libfdt.Fdt(bytes(page[:libfdt.Fdt(page).totalsize()]))
        f.resize(PAGE_SIZE)
        off = f.add_subnode(0, name)
        f.setprop(off, "preserved-data" if blob_size else "fdt", le64(phys))
        if blob_size:
            f.setprop(off, "blob-size", le64(size))
        f.pack()
        raw = f.as_bytearray()
        page[:len(raw)] = raw
    return bytes(page[:libfdt.Fdt(page).totalsize()])


# -- 7.0: the root FDT from boot, edited in place -------------------------------------------
def test_70_root_fdt_at_boot_is_kho_v1_with_map_0_and_children_newest_first():
    m = boot("7.0")
    kho = m.kho_out
    fdt = kho.root_fdt()
    sub = {b.name: b for b in kho.blobs("sub_fdts")}
    assert list(sub) == ["kho_test", "memblock"]          # module init, then late_initcall
    want = reference_root("kho-v1", 0, [("kho_test", sub["kho_test"].phys, 0),
                                        ("memblock", sub["memblock"].phys, 0)], False)
    assert fdt == want
    assert children(fdt) == [("memblock", [("fdt", le64(sub["memblock"].phys))]),
                             ("kho_test", [("fdt", le64(sub["kho_test"].phys))])]
    # The page is edited in place: one preserved order-0 page for the kernel's lifetime.
    assert kho.track.is_preserved(kho.fdt_page, 0)
    assert not kho.finalized and kho.producers == []      # no notifiers in 6.19+


@pytest.mark.skipif(shutil.which("dtc") is None, reason="dtc is the oracle here")
def test_70_dtc_reads_the_root_as_the_kernel_leaves_it():
    m = boot("7.0")
    out = subprocess.run(["dtc", "-I", "dtb", "-O", "dts", "-"], input=m.kho_out.root_fdt(),
                         capture_output=True, check=True).stdout.decode()
    assert out.index("memblock {") < out.index("kho_test {")
    assert 'compatible = "kho-v1";\n\tpreserved-memory-map = <0x00 0x00>;' in out


def test_70_out_fdt_size_is_fixed_at_kho_init():
    m = boot("7.0")
    blob = next(b for b in m.kho_out.blobs("out") if b.name == "fdt")
    # kho_init made out/fdt before any producer: 152 bytes, the FDT has grown since.
    assert blob.size == 152
    assert len(m.kho_out.root_fdt()) == 228


def test_70_finalize_refreshes_every_time_and_0_is_einval():
    m = boot("7.0", "kho=on")
    kho = m.kho_out
    for _ in range(2):
        with pytest.raises(KernelError) as e:
            kho.set_finalize(0)
        assert e.value.errno == errno.EINVAL
        kho.set_finalize(1)
        assert kho.finalized
    first = kho.preserved_mem_map
    assert first
    p = m.pages.alloc_range(1)
    kho.preserve_pages(p, PAGE_SIZE)                       # allowed after a finalize
    kho.set_finalize(5)                                    # any nonzero value refreshes
    assert kho.preserved_mem_map != first
    page = page_fdt(m)
    off = page.index(le64(kho.preserved_mem_map))
    assert off < len(kho.root_fdt())
    with pytest.raises(KernelError) as e:
        kho.set_finalize(0)
    assert e.value.errno == errno.EINVAL and kho.finalized
    n = kexec(m)
    assert n.preserved.contains(p, p + PAGE_SIZE)


def test_70_preservation_after_finalize_needs_another_write_of_1():
    m = boot("7.0", "kho=on")
    kho = m.kho_out
    kho.set_finalize(1)
    p = m.pages.alloc_pages(5)                 # an order with no bitmap yet: not in the map
    kho.preserve_folio(p, 5)
    n = kexec(m)
    assert not n.preserved.contains(p, p + (PAGE_SIZE << 5))
    m = boot("7.0", "kho=on")
    m.kho_out.set_finalize(1)
    p = m.pages.alloc_pages(5)
    m.kho_out.preserve_folio(p, 5)
    m.kho_out.set_finalize(1)
    assert kexec(m).preserved.contains(p, p + (PAGE_SIZE << 5))


def test_70_bits_set_in_a_serialized_bitmap_reach_the_next_kernel_anyway():
    # (inferred) kho_mem_serialize stores pointers to the live bitmaps, not copies.
    m = boot("7.0", "kho=on")
    m.kho_out.set_finalize(1)
    p = m.pages.alloc_range(1)                 # order 0, in the bitmap of the FDT's own page
    m.kho_out.preserve_pages(p, PAGE_SIZE)
    assert kexec(m).preserved.contains(p, p + PAGE_SIZE)


def test_70_kexec_before_finalize_hands_over_map_0_and_revival_is_disabled():
    m = boot("7.0")
    img = m.kexec_load()
    assert img.fdt_phys == m.kho_out.fdt_page             # attached unfinalized (6.19+)
    n = kexec(m)
    assert texts(n) == ["KHO: disabling KHO revival: -2"]
    assert n.kho_in is None
    t = Tree(n)
    assert t.in_ is None and {c.name for c in t.listdir(t.out)} >= {"fdt", "finalize"}


def test_70_after_a_kho_kexec_there_is_no_out_fdt():
    m = boot("7.0")
    m.kho_out.set_finalize(1)
    n = kexec(m)
    assert texts(n) == ["KHO: found kexec handover data.",
                        "Revived memory reservation 'test_resv' from KHO",
                        "test_kho: KHO restore succeeded"]
    t = Tree(n)
    assert [c.name for c in t.listdir(t.out)] == ["finalize", "scratch_len", "scratch_phys",
                                                 "sub_fdts"]
    # The restored test module does not register again; memblock does.
    assert [c.name for c in t.listdir(t.out_sub)] == ["memblock"]
    assert [name for name, _, _ in n.kho_in.blobs] == ["memblock", "kho_test"]


def test_70_subtree_appears_at_registration_and_goes_at_removal():
    m = boot("7.0", "kho=on")
    kho = m.kho_out
    sw = libfdt.FdtSw(256)
    sw.finish_reservemap()
    sw.begin_node("")
    sw.end_node()
    fdt = sw.as_fdt()
    dtb = bytes(fdt.as_bytearray()[:fdt.totalsize()])
    u = UserSubtree(kho, "mine", dtb)
    u.init_subtree(kho)
    assert [b.name for b in kho.blobs("sub_fdts")] == ["mine"]
    with pytest.raises(KernelError) as e:
        UserSubtree(kho, "mine", dtb).init_subtree(kho)
    assert e.value.errno == errno.EEXIST
    u.remove_subtree(kho)
    assert kho.blobs("sub_fdts") == [] and children(kho.root_fdt()) == []
    with pytest.raises(KernelError) as e:
        UserSubtree(kho, "raw", b"not an fdt")
    assert e.value.errno == errno.EINVAL


# -- 7.1: radix tree, kho-v3, kexec-metadata ----------------------------------------------------
def test_radix_key_worked_examples():
    # notes §4.5: phys 0x1004000 order 2 and phys 0x1003000 order 0.
    k = encode_key(0x1004000, 2)
    assert k == (1 << 50) | 0x401 and decode_key(k) == (0x1004000, 2)
    assert [table_index(k, lv) for lv in (5, 4, 3, 2, 1)] == [0, 256, 0, 0, 0]
    assert k % 32768 == 1025
    k = encode_key(0x1003000, 0)
    assert [table_index(k, lv) for lv in (5, 4, 3, 2, 1)] == [2, 0, 0, 0, 0]
    assert k % 32768 == 4099 and KHO_TREE_MAX_DEPTH == 6


def test_radix_tree_lives_in_memory_and_the_walk_reads_it_back():
    m = boot("7.1", "kho=on")
    t = m.kho_out.track
    assert isinstance(t, RadixTracker)
    t.preserve_blocks(0x1004000 >> 12, 1, 2)
    t.preserve_blocks(0x1003000 >> 12, 1, 0)
    root = m.mem.read(t.root, PAGE_SIZE)
    assert struct.unpack_from("<Q", root, 0)[0] and struct.unpack_from("<Q", root, 16)[0]
    runs = list(walk_radix_map(m.mem, t.root))
    assert (2, 0x1004000, 0x4000) in runs and (0, 0x1003000, 0x1000) in runs


def test_71_root_fdt_bytes_and_sizes_as_observed():
    m = boot("7.1")
    kho = m.kho_out
    sub = {b.name: b for b in kho.blobs("sub_fdts")}
    assert {n: b.size for n, b in sub.items()} == {"kexec-metadata": 73, "kho_test": 240,
                                                  "memblock": 214}
    want = reference_root("kho-v3", kho.track.root,
                          [(n, sub[n].phys, sub[n].size)
                           for n in ("kexec-metadata", "kho_test", "memblock")], True)
    fdt = kho.root_fdt()
    assert fdt == want and len(fdt) == 353
    out_fdt = next(b for b in kho.blobs("out") if b.name == "fdt")
    assert out_fdt.size == 233                    # fixed after kexec-metadata, before the rest
    # Each child: blob-size, then preserved-data (fdt_setprop inserts before older props).
    assert children(fdt)[2] == ("kexec-metadata", [("blob-size", le64(73)),
                                                    ("preserved-data", le64(sub["kexec-metadata"].phys))])
    md = m.mem.read(sub["kexec-metadata"].phys, 73)
    assert md == struct.pack("<I", 1) + b"7.1.0-khofs".ljust(65, b"\0") + struct.pack("<I", 1)


def test_71_tree_has_no_finalize_and_out_fdt_only_on_a_cold_boot():
    m = boot("7.1", release="7.1.5")
    t = Tree(m)
    assert t.finalize is None
    assert [c.name for c in t.listdir(t.out)] == ["fdt", "scratch_len", "scratch_phys", "sub_fdts"]
    assert m.status()["finalized"] is None
    n = kexec(m, release="7.1.5")
    t = Tree(n)
    assert [c.name for c in t.listdir(t.out)] == ["scratch_len", "scratch_phys", "sub_fdts"]
    assert sorted(c.name for c in t.listdir(t.out_sub)) == ["kexec-metadata", "memblock"]
    assert [(name, size) for name, _, size in n.kho_in.blobs] == \
        [("memblock", 214), ("kho_test", 240), ("kexec-metadata", 73)]


def test_71_three_kernel_chain_carries_bytes_and_the_count():
    m = boot("7.1", "kho=on reserve_mem=1M:4096:test_resv", release="7.1.5")
    p = m.pages.alloc_range(3)
    m.mem.write(p, b"survives" * 1536)
    m.kho_out.preserve_pages(p, 3 * PAGE_SIZE)
    n = kexec(m, release="7.1.5")
    assert texts(n) == ["KHO: found kexec handover data.",
                        "Revived memory reservation 'test_resv' from KHO",
                        "KHO: exec from: 7.1.5 (count 1)"]
    assert n.mem.read(p, 3 * PAGE_SIZE) == b"survives" * 1536
    q = n.pages.alloc_range(1)
    n.mem.write(q, b"second")
    n.kho_out.preserve_pages(q, PAGE_SIZE)
    n2 = kexec(n, release="7.1.6")
    assert "KHO: exec from: 7.1.5 (count 2)" in texts(n2)
    assert n2.mem.read(q, 6) == b"second"
    assert n2.status()["kexec_metadata"] == {"previous_release": "7.1.5", "kexec_count": 2}
    md = next(b for b in n2.kho_out.blobs("sub_fdts") if b.name == "kexec-metadata")
    assert n2.mem.read(md.phys, 73)[4:10] == b"7.1.6\0" and n2.mem.read(md.phys + 69, 4) == le64(3)[:4]


def _kexec_with_metadata(bytes_, size):
    m = boot("7.1", "kho=on")
    md = next(b for b in m.kho_out.blobs("sub_fdts") if b.name == "kexec-metadata")
    m.mem.write(md.phys, bytes_)
    if size != 73:
        page = bytearray(page_fdt(m))
        page[page.index(le64(73)):page.index(le64(73)) + 8] = le64(size)
        m.mem.write(m.kho_out.fdt_page, page)
    return kexec(m)


@pytest.mark.parametrize("data,size,line", [
    (b"", 3, "KHO: kexec-metadata blob too small (3 bytes)"),
    (struct.pack("<I", 2), 73, "KHO: kexec-metadata version 2 not supported (expected 1)"),
    (b"", 72, "KHO: kexec-metadata blob too small for v1 (72 < 73)"),
])
def test_71_bad_metadata_is_reported_and_the_count_restarts(data, size, line):
    n = _kexec_with_metadata(data, size)
    assert line in texts(n) and not any("exec from" in t for t in texts(n))
    md = next(b for b in n.kho_out.blobs("sub_fdts") if b.name == "kexec-metadata")
    assert n.mem.read(md.phys + 69, 4) == struct.pack("<I", 1)


def test_71_child_without_blob_size_gets_no_in_file_and_a_warning():
    m = boot("7.1", "kho=on")
    kho = m.kho_out
    u = UserSubtree(kho, "raw", b"\x01\x02\x03 any format")
    u.init_subtree(kho)
    buf = bytearray(page_fdt(m))
    libfdt.fdt_delprop(buf, libfdt.fdt_subnode_offset(buf, 0, "raw"), "blob-size")
    m.mem.write(kho.fdt_page, buf)
    n = kexec(m)
    assert "KHO: node raw missing or invalid blob-size property" in texts(n)
    assert [name for name, _, _ in n.kho_in.blobs] == ["kexec-metadata"]


def test_71_raw_blob_subtree_round_trips_with_its_size():
    m = boot("7.1", "kho=on")
    u = UserSubtree(m.kho_out, "raw", b"\x00\xffraw bytes")
    u.init_subtree(m.kho_out)
    n = kexec(m)
    (name, phys, size), = [b for b in n.kho_in.blobs if b[0] == "raw"]
    assert size == 11 and n.mem.read(phys, size) == b"\x00\xffraw bytes"


def test_71_map_0_disables_revival_without_a_number():
    m = boot("7.1", "kho=on")
    buf = bytearray(page_fdt(m))
    i = buf.index(le64(m.kho_out.track.root))
    buf[i:i + 8] = le64(0)
    m.mem.write(m.kho_out.fdt_page, buf)
    n = kexec(m)
    assert texts(n) == ["KHO: disabling KHO revival"] and n.kho_in is None


def test_71_broken_tree_is_rejected_and_the_boot_goes_on_cold():
    m = boot("7.1", "kho=on")
    root = m.kho_out.track.root
    m.mem.write(root + 8, le64(0x123))               # a table pointer that is not a page
    with pytest.raises(MapError):
        list(walk_radix_map(m.mem, root))
    n = kexec(m)
    assert any(t.startswith("khofs: the preserved-memory tree is broken") for t in texts(n))
    assert n.kho_in is None
    t = Tree(n)
    assert t.in_ is None and "fdt" in [c.name for c in t.listdir(t.out)]


def test_exec_from_is_logged_only_by_71():
    for abi in ("6.16", "6.18", "7.0"):
        m = boot(abi, "kho=on")
        if m.profile.has_finalize:
            m.kho_out.set_finalize(1)
        assert not any("exec from" in t for t in texts(kexec(m)))


def test_1_tib_of_order_0_pages_is_cheap_in_the_radix_tree():
    import time
    size = 1 << 40
    m = Machine("kho=on kho_scratch=64M,64M,64M",
                MachineConfig(memory=(1 << 32) + 2 * size, abi="7.1"))
    t0 = time.perf_counter()
    m.kho_out.preserve_folios(1 << 32, size >> 12, 0)
    runs = list(walk_radix_map(m.mem, m.kho_out.track.root))
    took = time.perf_counter() - t0
    assert (0, 1 << 32, size) in runs
    assert len(m.kho_out.track.leaves) == (size >> 12) // 32768 + 1    # + the FDT's own
    assert took < 1.5


# -- kexec from one release into another ---------------------------------------------------------


@pytest.mark.parametrize("src,dst", list(CROSS), ids=[f"{s}-to-{d}" for s, d in CROSS])
def test_cross_release_kexec(src, dst):
    accepted, map_ok, rejection = CROSS[(src, dst)]
    m = boot(src, "kho=on reserve_mem=1M:4096:test_resv")
    p = m.pages.alloc_range(2)
    m.kho_out.preserve_pages(p, 2 * PAGE_SIZE)
    if m.profile.has_finalize:
        m.kho_out.set_finalize(1)
    n = kexec(m, abi=dst)
    assert n.profile.name == dst and n.release == n.profile.release
    lines = texts(n)
    assert (n.kho_in is not None) == accepted
    if accepted:
        assert lines[0] == n.profile.found_line
        assert "Revived memory reservation 'test_resv' from KHO" in lines
        # A misread map (512-byte vs page-sized bitmaps) does not name what was preserved.
        assert n.preserved.contains(p, p + 2 * PAGE_SIZE) or not map_ok
        clean = not any(t.startswith(("khofs:", "KHO: failed")) for t in lines)
        assert clean == map_ok
    else:
        want, revival = rejection
        assert lines[0].startswith("KHO: setup: handover FDT (0x")
        assert lines[0].endswith(f"is incompatible with '{want}': 1")
        assert lines[1] == revival == n.profile.revival_line(-errno.EINVAL)
        assert not n.preserved.contains(p, p + PAGE_SIZE)
    metadata = [t for t in lines if t.startswith("KHO: exec from:")]
    assert metadata == ([f"KHO: exec from: {m.release} (count 1)"]
                        if accepted and n.profile.kexec_metadata else [])


def test_70_unfinalized_into_618_is_accepted_with_nothing_preserved():
    m = boot("7.0", "kho=on")
    n = kexec(m, abi="6.18")
    assert texts(n) == ["KHO: found kexec handover data. Will skip init for some devices",
                        "KHO: failed to restore folio for KHO fdt"]
    assert n.kho_in is not None and n.preserved.total() == 0


def test_70_failing_setprop_returns_the_libfdt_error_and_leaves_the_node():
    m = boot("7.0", "kho=on")
    kho = m.kho_out
    names = [f"n{i:029d}" for i in range(200)]      # 30-character names fill the page
    with pytest.raises(KernelError) as e:
        for name in names:
            kho.add_subtree(name, 0x1000)
    added = len(kho.blobs("sub_fdts"))
    assert e.value.errno in (errno.ENOMEM, libfdt.NOSPACE)
    if e.value.errno == libfdt.NOSPACE:               # the node fit, its property did not
        assert children(kho.root_fdt())[0] == (names[added], [])
    assert len(kho.root_fdt()) <= PAGE_SIZE


def test_71_preserve_pages_keeps_each_block_on_one_numa_node():
    m = Machine("kho=on", MachineConfig(memory=3 * G, nodes=3, abi="7.1"))
    m.kho_out.preserve_pages(0, 2 * G)          # greedy: one order-19 block over node 0 and 1
    runs = [r for r in walk_radix_map(m.mem, m.kho_out.track.root) if r[1] < 2 * G]
    assert runs == [(18, 0, 2 * G)]             # two order-18 blocks, one per node
    assert m.kho_out.track.is_preserved(G, 18) and not m.kho_out.track.is_preserved(0, 19)
    m7 = Machine("kho=on", MachineConfig(memory=3 * G, nodes=3, abi="7.0"))
    m7.kho_out.preserve_pages(0, 2 * G)
    assert m7.kho_out.track.is_preserved(0, 19)


def test_71_missing_map_property_says_so_and_disables_revival():
    m = boot("7.1", "kho=on")
    f = libfdt.Fdt(bytearray(page_fdt(m)))
    f.delprop(0, "preserved-memory-map")
    m.mem.write(m.kho_out.fdt_page, bytes(f.as_bytearray()))
    n = kexec(m)
    assert texts(n) == ["KHO: failed to get preserved memory map", "KHO: disabling KHO revival"]
    assert n.kho_in is None


def test_71_release_of_64_characters_fills_the_metadata_and_65_is_refused():
    import argparse
    from khofs.cli.common import release_arg
    m = boot("7.1", "kho=on", release="r" * 64)
    md = next(b for b in m.kho_out.blobs("sub_fdts") if b.name == "kexec-metadata")
    assert m.mem.read(md.phys + 4, 65) == b"r" * 64 + b"\0"
    assert f"KHO: exec from: {'r' * 64} (count 1)" in texts(kexec(m))
    assert release_arg("r" * 64) == "r" * 64
    with pytest.raises(argparse.ArgumentTypeError):
        release_arg("r" * 65)
