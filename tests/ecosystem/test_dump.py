"""khofs dump: decoding, the memory-map walk, --json, and the bindings check."""

import json
import struct

import libfdt
import pytest

from ecohelp import khofs

pytestmark = pytest.mark.fuse


@pytest.fixture
def kho(mnt):
    r = khofs("mount", mnt, "--memory", "1G", "--cmdline",
              "kho=on kho_scratch=16M,64M,16M reserve_mem=4M:4096:oops")
    assert r.returncode == 0, r.stderr
    yield mnt


def _blob(props, children=()):
    sw = libfdt.FdtSw(4096)
    sw.finish_reservemap()
    sw.begin_node("")
    for name, value in props:
        sw.property(name, value)
    for cname, cprops in children:
        sw.begin_node(cname)
        for name, value in cprops:
            sw.property(name, value)
        sw.end_node()
    sw.end_node()
    f = sw.as_fdt()
    return bytes(f.as_bytearray()[:f.totalsize()])


def test_mounted_tree_text(kho):
    (kho / "kho/out/finalize").write_bytes(b"1")
    r = khofs("dump", kho)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    root = libfdt.Fdt((kho / "kho/out/fdt").read_bytes())
    pmm = struct.unpack("<Q", root.getprop(0, "preserved-memory-map"))[0]
    assert f"preserved-memory-map = 0x{pmm:x}" in out
    assert '-> sub-FDT memblock-v1, 210 bytes:' in out
    assert "size = 0x400000 (4 MiB)" in out
    # Walked map: the 4 MiB region at order 10, the two FDT pages at order 0.
    assert "order 10:" in out and "order  0:" in out
    assert "problems: none" in out


def test_mounted_tree_json(kho):
    (kho / "kho/out/finalize").write_bytes(b"1")
    r = khofs("dump", "--json", kho / "kho/out/fdt")
    assert r.returncode == 0
    d = json.loads(r.stdout)
    assert d["compatible"] == "kho-v1"
    assert d["header"]["off_mem_rsvmap"] == 48 and d["header"]["version"] == 17
    child = d["root"]["children"][0]
    assert child["name"] == "memblock"
    sub = child["sub_fdt"]
    assert sub["compatible"] == "memblock-v1"
    region = sub["root"]["children"][0]
    props = {p["name"]: p["value"] for p in region["properties"]}
    assert props["size"] == 4 << 20 and props["compatible"] == "reserve-mem-v1"
    mm = d["memory_map"]
    assert mm["error"] is None and mm["chunks"] == 2      # order 0 and order 10
    assert mm["total_bytes"] == (4 << 20) + 2 * 4096
    assert d["problems"] == []


def test_after_kexec_shows_in(kho):
    (kho / "kho/out/finalize").write_bytes(b"1")
    assert khofs("kexec", kho).returncode == 0
    d = json.loads(khofs("dump", "--json", kho).stdout)
    assert d["path"].endswith("/kho/in/fdt")            # out/ is not finalized: only in/
    assert d["root"]["children"][0]["sub_fdt"]["compatible"] == "memblock-v1"


def test_corrupted_handover_is_reported(kho):
    (kho / "kho/out/finalize").write_bytes(b"1")
    blob = bytearray((kho / "kho/out/fdt").read_bytes())
    i = blob.index(b"kho-v1")
    # Root may write into the blob in place, as on debugfs.
    with open(kho / "kho/out/fdt", "r+b") as f:
        f.seek(i)
        f.write(b"kho-v9")
    r = khofs("dump", kho / "kho/out/fdt")
    assert r.returncode == 1
    assert "compatible 'kho-v9' is not kho-v1" in r.stdout


def test_bindings_check_on_files(tmp_path):
    bad = _blob([("compatible", b"kho-v1\0"), ("preserved-memory-map", b"\0" * 4), ("extra", b"x")],
                [("prod", [("fdt", b"\0" * 8), ("junk", b"\1\2\3")]), ("nofdt", [])])
    path = tmp_path / "bad.dtb"
    path.write_bytes(bad)
    r = khofs("dump", path)
    assert r.returncode == 1
    assert "root: preserved-memory-map is 4 bytes, expected 8 (u64, native endian)" in r.stdout
    assert "root: unexpected property 'extra'" in r.stdout
    assert "prod: unexpected property 'junk'" in r.stdout
    assert "nofdt: missing required property 'fdt'" in r.stdout
    good = _blob([("compatible", b"kho-v1\0"), ("preserved-memory-map", struct.pack("<Q", 0x1000))],
                 [("prod", [("fdt", struct.pack("<Q", 0x2000))])])
    path.write_bytes(good)
    r = khofs("dump", path)
    assert r.returncode == 0, r.stdout
    assert "fdt = 0x2000" in r.stdout


def test_not_an_fdt(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"hello")
    r = khofs("dump", p)
    assert r.returncode == 1 and "not a valid FDT" in r.stdout
    r = khofs("dump", tmp_path / "missing")
    assert r.returncode == 1 and "missing" in r.stderr
