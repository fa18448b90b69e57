"""The bytes of the root FDT and the memblock sub-FDT (KHO-SPEC §4, §7, §10; facts Q6, Q8)."""

import shutil
import struct
import subprocess

import libfdt

from khofs.kernel.machine import Machine, MachineConfig

G = 1 << 30
HEADER = struct.Struct(">10I")
FDT_MAGIC = 0xD00DFEED


def boot(cmdline):
    return Machine(cmdline, MachineConfig(memory=G))


def le64(v):
    return struct.pack("<Q", v)


def finished(sw):
    fdt = sw.as_fdt()
    return bytes(fdt.as_bytearray()[:fdt.totalsize()])


def expected_root(map_phys, children):
    sw = libfdt.FdtSw(4096)
    sw.finish_reservemap()
    sw.begin_node("")
    sw.property_string("compatible", "kho-v1")
    sw.property("preserved-memory-map", le64(map_phys))
    for name, phys in children:
        sw.begin_node(name)
        sw.property("fdt", le64(phys))
        sw.end_node()
    sw.end_node()
    return finished(sw)


def expected_memblock(regions):
    sw = libfdt.FdtSw(4096)
    sw.finish_reservemap()
    sw.begin_node("")
    sw.property_string("compatible", "memblock-v1")
    for r in regions:
        sw.begin_node(r.name)
        sw.property_string("compatible", "reserve-mem-v1")
        sw.property("start", le64(r.start))
        sw.property("size", le64(r.size))
        sw.end_node()
    sw.end_node()
    return finished(sw)


def header(blob):
    names = ("magic totalsize off_dt_struct off_dt_strings off_mem_rsvmap version "
             "last_comp_version boot_cpuid_phys size_dt_strings size_dt_struct").split()
    return dict(zip(names, HEADER.unpack_from(blob)))


def finalized(cmdline="kho=on"):
    m = boot(cmdline)
    m.kho_out.set_finalize(1)
    return m


def test_root_fdt_without_subtree_matches_libfdt():
    m = finalized()
    out = m.kho_out
    blob = out.root_fdt()
    assert blob == expected_root(out.preserved_mem_map, [])
    assert len(blob) == 152


def test_root_fdt_with_memblock_matches_libfdt():
    m = finalized("kho=on reserve_mem=4M:4K:foo")
    out = m.kho_out
    mb = out.blobs("sub_fdts")[0]
    blob = out.root_fdt()
    assert blob == expected_root(out.preserved_mem_map, [("memblock", mb.phys)])
    assert len(blob) == 196
    # the debugfs blob serves exactly these bytes
    fdt = out.blobs("out")[0]
    assert m.mem.read(fdt.phys, fdt.size) == blob


def test_root_fdt_header():
    m = finalized("kho=on reserve_mem=4M:4K:foo")
    blob = m.kho_out.root_fdt()
    h = header(blob)
    assert h["magic"] == FDT_MAGIC
    assert h["version"] == 17
    assert h["last_comp_version"] == 16
    assert h["boot_cpuid_phys"] == 0
    assert h["off_mem_rsvmap"] == 48
    assert blob[48:64] == bytes(16)                 # only the terminating entry
    assert h["off_dt_struct"] == 64
    assert h["off_dt_strings"] == h["off_dt_struct"] + h["size_dt_struct"]
    strings = blob[h["off_dt_strings"]:h["off_dt_strings"] + h["size_dt_strings"]]
    assert strings == b"fdt\0preserved-memory-map\0compatible\0"
    assert h["totalsize"] == h["off_dt_strings"] + h["size_dt_strings"] == len(blob)


def test_root_fdt_strings_without_subtree():
    blob = finalized().kho_out.root_fdt()
    h = header(blob)
    assert blob[h["off_dt_strings"]:] == b"preserved-memory-map\0compatible\0"


def test_root_fdt_properties_are_little_endian():
    m = finalized("kho=on reserve_mem=4M:4K:foo")
    out = m.kho_out
    f = libfdt.Fdt(bytearray(out.root_fdt()))
    assert f.getprop(0, "compatible") == b"kho-v1\0"
    assert bytes(f.getprop(0, "preserved-memory-map")) == le64(out.preserved_mem_map)
    node = f.subnode_offset(0, "memblock")
    assert bytes(f.getprop(node, "fdt")) == le64(out.blobs("sub_fdts")[0].phys)


def test_refinalize_rebuilds_the_same_layout():
    m = finalized("kho=on reserve_mem=4M:4K:foo")
    out = m.kho_out
    first = out.root_fdt()
    out.set_finalize(0)
    out.set_finalize(1)
    second = out.root_fdt()
    assert len(second) == len(first)
    assert second == expected_root(out.preserved_mem_map, [("memblock", out.blobs("sub_fdts")[0].phys)])


def test_dtc_accepts_root_fdt(tmp_path):
    dtc = shutil.which("dtc")
    assert dtc is not None
    m = finalized("kho=on reserve_mem=4M:4K:foo")
    out = m.kho_out
    path = tmp_path / "fdt"
    path.write_bytes(out.root_fdt())
    res = subprocess.run([dtc, "-I", "dtb", "-O", "dts", str(path)], capture_output=True,
                         text=True, timeout=10)
    assert res.returncode == 0, res.stderr
    assert 'compatible = "kho-v1";' in res.stdout
    hi, lo = struct.unpack(">II", le64(out.preserved_mem_map))
    assert f"preserved-memory-map = <0x{hi:02x} 0x{lo:02x}>;" in res.stdout
    assert "memblock {" in res.stdout


def test_memblock_sub_fdt_layout():
    m = boot("kho=on reserve_mem=4M:4K:foo reserve_mem=1M:2M:bar_region")
    out = m.kho_out
    out.set_finalize(1)
    (sub,) = out.blobs("sub_fdts")
    blob = m.mem.read(sub.phys, sub.size)
    assert blob == expected_memblock(m.reserve_mem)
    f = libfdt.Fdt(bytearray(blob))
    assert f.getprop(0, "compatible") == b"memblock-v1\0"
    for r in m.reserve_mem:
        node = f.subnode_offset(0, r.name)
        assert f.getprop(node, "compatible") == b"reserve-mem-v1\0"
        assert bytes(f.getprop(node, "start")) == le64(r.start)
        assert bytes(f.getprop(node, "size")) == le64(r.size)
    assert [r.name for r in m.reserve_mem] == ["foo", "bar_region"]


def test_memblock_sub_fdt_size_one_region():
    # 214 bytes with one region whose name takes 9-12 bytes with its NUL (§10)
    m = finalized("kho=on reserve_mem=4M:4K:trace_rm")
    (sub,) = m.kho_out.blobs("sub_fdts")
    assert sub.size == 214


def test_kho_test_and_memblock_subtrees():
    # §10: root 236 bytes with kho_test (module init) before memblock (late initcall);
    # the 6.18 kho_test sub-FDT is 240 bytes (folios_info is a 16-byte struct kho_vmalloc).
    m = finalized("kho=on khofs.test_kho=1 reserve_mem=4M:4K:foo")
    out = m.kho_out
    root = out.root_fdt()
    assert len(root) == 236
    f = libfdt.Fdt(bytearray(root))
    assert [f.get_name(o) for o in (f.first_subnode(0), f.next_subnode(f.first_subnode(0)))] == [
        "kho_test", "memblock"]
    blobs = {b.name: b for b in out.blobs("sub_fdts")}
    kt = m.mem.read(blobs["kho_test"].phys, blobs["kho_test"].size)
    t = libfdt.Fdt(bytearray(kt))
    assert bytes(t.getprop(0, "compatible")) == b"kho-test-v1\0"
    assert bytes(t.getprop(0, "magic")) == struct.pack("<I", 0x4B484F21)
    data = t.subnode_offset(0, "data")
    assert len(t.getprop(data, "nr_folios")) == 4
    assert len(t.getprop(data, "csum")) == 4
    assert len(t.getprop(data, "folios_info")) == 16
    assert len(kt) == 240
