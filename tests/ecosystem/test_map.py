"""khofs map: the physical layout as text and as a picture (SVG content, not pixels)."""

import re
import shutil
import struct
import subprocess
import sys

import libfdt
import pytest

from ecohelp import khofs
from khofs.client import Client

pytestmark = pytest.mark.fuse

CMDLINE = "kho=on kho_scratch=16M,64M,16M reserve_mem=4M:4096:oops"


def _mount(mnt, *args):
    r = khofs("mount", mnt, *args)
    assert r.returncode == 0, r.stderr


@pytest.fixture
def preserved(mnt):
    """1 GiB, an order-9 folio and three pages preserved, finalized."""
    _mount(mnt, "--memory", "1G", "--cmdline", CMDLINE)
    with Client(mnt) as c:
        folio = c.mem_alloc(2 << 20)
        c.preserve_folio(folio, 9)
        pages = c.mem_alloc(3 * 4096)
        c.preserve(pages, 3 * 4096)
    (mnt / "kho/out/finalize").write_bytes(b"1")
    return mnt, folio, pages


def _row(label, start, end, size, extra=""):
    return f"  {label:<21} [0x{start:012x}, 0x{end:012x})  {size:>10}{extra}"


def test_text_with_preserved_memory(preserved):
    mnt, folio, pages = preserved
    with Client(mnt) as c:
        fdt_phys = c.call("memory_layout")["fdt_phys"]
    root = libfdt.Fdt((mnt / "kho/out/fdt").read_bytes())
    sub = struct.unpack("<Q", root.getprop(root.path_offset("/memblock"), "fdt"))[0]
    sub_len = len((mnt / "kho/out/sub_fdts/memblock").read_bytes())
    root_len = len((mnt / "kho/out/fdt").read_bytes())
    r = khofs("map", mnt)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"{mnt}: physical memory layout (ABI 6.18), RAM 1 GiB"
    # The three pages split as the kernel splits them: order 0, order 1; the FDT pages at
    # order 0 too (the memblock sub-FDT's page and the root's are both preserved).
    assert pages + 4096 == 0x3fbfa000 and fdt_phys == 0x3fbfe000 and sub == 0x3fbfd000
    expect = [
        "RAM:",
        _row("node 0", 0, 1 << 30, "1 GiB"),
        "scratch:",
        _row("node 0", 0x39a00000, 0x3aa00000, "16 MiB"),
        _row("global", 0x3aa00000, 0x3ea00000, "64 MiB"),
        _row("lowmem", 0x3ea00000, 0x3fa00000, "16 MiB"),
        "reserve_mem:",
        _row("oops", 0x3fc00000, 0x40000000, "4 MiB"),
        "preserved (out: handed over by this kernel, merged by order):",
        _row("order 0", pages, pages + 4096, "4 KiB", "  1 block(s)"),
        _row("order 0", sub, fdt_phys + 4096, "8 KiB", "  2 block(s)"),
        _row("order 1", pages + 4096, pages + 3 * 4096, "8 KiB", "  1 block(s)"),
        _row("order 9", folio, folio + (2 << 20), "2 MiB", "  1 block(s)"),
        _row("order 10", 0x3fc00000, 0x40000000, "4 MiB", "  1 block(s)"),
        "FDTs:",
        _row("out/sub_fdts/memblock", sub, sub + sub_len, f"{sub_len} bytes"),
        _row("out/fdt", fdt_phys, fdt_phys + root_len, f"{root_len} bytes"),
        "totals:",
        "  RAM:              1 GiB (1073741824 bytes) in 1 region(s)",
        "  scratch:          96 MiB (100663296 bytes) in 3 region(s)",
        "  reserve_mem:      4 MiB (4194304 bytes) in 1 region(s)",
        "  preserved (out):  6.02 MiB (6311936 bytes) in 5 range(s); order 0: 12 KiB, "
        "order 1: 8 KiB, order 9: 2 MiB, order 10: 4 MiB",
        f"  FDTs:             {sub_len + root_len} bytes in 2 FDT(s)",
    ]
    assert lines[1:] == expect


def test_after_kexec_the_received_map(preserved):
    mnt, folio, pages = preserved
    assert khofs("kexec", mnt).returncode == 0
    r = khofs("map", mnt)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    # What the new kernel read from the handed-over map; out/ is not finalized.
    assert "preserved (in: received, merged by order):" in out
    assert "preserved (out" not in out
    assert re.search(rf"\n  order 9 +\[0x{folio:012x}, 0x{folio + (2 << 20):012x}\) +2 MiB  "
                     r"1 block\(s\)\n", out)
    assert re.search(r"\n  in/fdt +\[0x00003fbfe000, ", out)
    assert re.search(r"\n  in/sub_fdts/memblock +\[0x00003fbfd000, ", out)
    assert "preserved (in):   6.02 MiB (6311936 bytes) in 5 range(s)" in out
    # The revived reserve_mem region is listed once.
    assert out.count("  oops ") == 1


def test_unfinalized_says_where_the_map_is(mnt):
    _mount(mnt, "--memory", "1G", "--cmdline", CMDLINE)
    with Client(mnt) as c:
        c.preserve(c.mem_alloc(8192), 8192)
    r = khofs("map", mnt)
    assert r.returncode == 0, r.stderr
    assert "FDTs:\n  (none)\n" in r.stdout
    assert r.stdout.rstrip().endswith(
        "note: this kernel preserves 8 KiB; no out/fdt (the map is written at finalize: "
        "echo 1 > kho/out/finalize)")


def _named(labels, label) -> bool:
    """label drawn on its bar, or (too wide for it) a number on the bar and "N: label" in
    the key."""
    return label in labels or any(re.fullmatch(rf"(\d+): {re.escape(label)}", t) and
                                  t.split(":")[0] in labels for t in labels)


def _svg(path):
    text = path.read_text()
    labels = re.findall(r"<text[^>]*>([^<]*)</text>", text)
    bands = re.findall(r'<g id="(band-[^"]+)"', text)
    return text, labels, bands


def test_svg_content(preserved, tmp_path):
    mnt, folio, pages = preserved
    svg, png = tmp_path / "map.svg", tmp_path / "map.png"
    r = khofs("map", mnt, "--svg", svg, "--png", png)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{mnt}: physical memory layout")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text, labels, bands = _svg(svg)
    # One band per kind, drawn in both panels (to scale, and stretched).
    names = ["band-RAM", "band-scratch", "band-reserve_mem", "band-preserved-out", "band-FDTs"]
    assert bands == names + names
    for label in ("RAM", "scratch", "reserve_mem", "preserved (out)", "FDTs", "node 0", "lowmem",
                  "global", "oops", "out/fdt", "out/sub_fdts/memblock", "order 0 (4 KiB blocks)",
                  "order 1 (8 KiB blocks)", "order 9 (2 MiB blocks)", "order 10 (4 MiB blocks)",
                  "0x3fc00000", "0x40000000", "1 GiB", "920 MiB"):
        assert _named(labels, label), label
    assert "1: out/sub_fdts/memblock" in labels and "2: out/fdt" in labels
    # Each preserved range is one bar: five rectangles in the band of each panel.
    blocks = re.findall(r'<g id="band-preserved-out">(.*?)</g>', text, re.S)
    assert [len(re.findall(r"<path ", b)) for b in blocks] == [5, 5]


def test_one_tebibyte(mnt, tmp_path):
    # --memory sets the RAM size (-o memory= for mount(8)); two nodes of 512 GiB.
    _mount(mnt, "--memory", "1T", "--nodes", "2", "--cmdline", "kho=on reserve_mem=4M:4096:oops")
    (mnt / "kho/out/finalize").write_bytes(b"1")
    svg = tmp_path / "big.svg"
    r = khofs("map", mnt, "--svg", svg)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.splitlines()[0].endswith("RAM 1 TiB")
    assert _row("node 0", 0, 1 << 39, "512 GiB") in out
    assert _row("node 1", 1 << 39, 1 << 40, "512 GiB") in out
    with Client(mnt) as c:
        scratch = c.status()["scratch"]
    for name, s in zip(("lowmem", "global", "node 0", "node 1"), scratch):
        assert _row(name, s["addr"], s["addr"] + s["size"],
                    khofs_size(s["size"])) in out
    assert "  scratch:          " in out and "in 4 region(s)" in out
    _, labels, bands = _svg(svg)
    assert len(bands) == 10
    # The stretched panel still names every region and the real addresses around the
    # small ones (lowmem scratch below 4 GiB, the rest near the top of 1 TiB).
    for label in ("lowmem", "global", "node 0", "node 1", "oops", "out/fdt", "0x10000000000",
                  f"0x{scratch[0]['addr']:x}", "1 TiB", "512 GiB"):
        assert _named(labels, label), label


def khofs_size(n):
    from khofs.devicetree.memmap import fmt_size
    return fmt_size(n)


BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named " + repr(name))
sys.meta_path.insert(0, Block())
from khofs.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_without_matplotlib(preserved, tmp_path):
    mnt = preserved[0]
    for opt in ("--svg", "--png"):
        out = tmp_path / f"x.{opt[2:]}"
        r = subprocess.run([sys.executable, "-c", BLOCKER, "map", str(mnt), opt, str(out)],
                           capture_output=True, text=True)
        assert r.returncode == 1
        assert r.stderr == ("khofs: --svg/--png need matplotlib, which is not installed: "
                            "pip install 'khofs[plot]' (or run scripts/setup.sh)\n")
        assert r.stdout == "" and not out.exists()
    # Text needs no matplotlib.
    r = subprocess.run([sys.executable, "-c", BLOCKER, "map", str(mnt)], capture_output=True,
                       text=True)
    assert r.returncode == 0 and "preserved (out" in r.stdout


def test_bad_input(tmp_path, mnt):
    for path in (tmp_path, tmp_path / "missing"):
        r = khofs("map", path)
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr == (f"khofs: {path}: no kho/ tree here (not a khofs mount, or KHO "
                            "is off)\n")
    _mount(mnt, "--cmdline", "kho=off", "--memory", "1G")
    r = khofs("map", mnt)
    assert r.returncode == 1 and "no kho/ tree here" in r.stderr and r.stderr.count("\n") == 1
    assert khofs("umount", mnt).returncode == 0
    _mount(mnt, "--cmdline", CMDLINE, "--memory", "1G")
    r = khofs("map", mnt, "--svg", tmp_path / "no/such/dir/x.svg")
    assert r.returncode == 1 and r.stderr.startswith("khofs: cannot write ")
    assert r.stderr.count("\n") == 1


def test_a_copy_of_a_kho_tree(preserved, tmp_path):
    """No daemon: what the tree itself shows (scratch, sub-FDT locations, reserve_mem)."""
    mnt = preserved[0]
    copy = tmp_path / "copy"
    shutil.copytree(mnt / "kho", copy / "kho")
    r = khofs("map", copy)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.splitlines()[0] == f"{copy}: physical memory layout, RAM unknown"
    assert _row("lowmem", 0x3ea00000, 0x3fa00000, "16 MiB") in out
    assert _row("oops", 0x3fc00000, 0x40000000, "4 MiB") in out   # from the memblock FDT
    assert re.search(r"\n  out/sub_fdts/memblock +\[0x00003fbfd000, ", out)
    assert "out/fdt " not in out            # the root FDT's page is not in debugfs
    assert "note: preserved ranges not shown: out/fdt's memory map lives in preserved memory, " \
        "which a copy or a snapshot does not hold" in out
    assert "note: not shown, as a kho/ tree does not hold them: the root FDTs' addresses, " \
        "RAM's size; a khofs mount's daemon tells them (khofs map MOUNTPOINT)" in out
    (copy / "kho/out/scratch_len").write_text("0x1000000\nbogus\n")
    r = khofs("map", copy)
    assert r.returncode == 1
    assert r.stderr == f"khofs: {copy}/kho/out/scratch_len: not one hex address a line\n"
    (copy / "kho/out/scratch_len").write_text("0x1000000\n")
    (copy / "kho/out/fdt").write_bytes(b"junk")
    r = khofs("map", copy)
    assert r.returncode == 1 and r.stderr.startswith(f"khofs: {copy}/kho/out/fdt: not a valid FDT")
    assert r.stderr.count("\n") == 1


def test_7x_root_fdt_grown_past_its_file(mnt):
    """7.x: out/fdt keeps the size of the cold boot's FDT; map reads the rest from memory."""
    _mount(mnt, "--abi", "7.1", "--memory", "1G", "--cmdline", CMDLINE)
    shown = (mnt / "kho/out/fdt").read_bytes()
    with Client(mnt) as c:
        fdt_phys = c.call("memory_layout")["fdt_phys"]
        size = struct.unpack(">I", c.mem_read(fdt_phys + 4, 4))[0]
        full = c.mem_read(fdt_phys, size)
    assert len(shown) < size
    root = libfdt.Fdt(full)
    r = khofs("map", mnt)
    assert r.returncode == 0, r.stderr
    for name in ("memblock", "kexec-metadata"):
        node = root.path_offset(f"/{name}")
        at = struct.unpack("<Q", root.getprop(node, "preserved-data"))[0]
        blob_size = struct.unpack("<Q", root.getprop(node, "blob-size"))[0]
        assert re.search(rf"\n  out/sub_fdts/{name} +\[0x{at:012x}, 0x{at + blob_size:012x}\) +"
                         rf"{blob_size} bytes\n", r.stdout)
    assert re.search(rf"\n  out/fdt +\[0x{fdt_phys:012x}, 0x{fdt_phys + size:012x}\) +"
                     rf"{size} bytes\n", r.stdout)
    assert r.stdout.rstrip().endswith(
        f"note: out/fdt shows {len(shown)} of the FDT's {size} bytes (its size was fixed when "
        "the file was made); the rest read from memory")


def test_memory_layout_without_kho(mnt):
    _mount(mnt, "--cmdline", "kho=off reserve_mem=4M:4096:oops", "--memory", "1G", "--nodes", "2")
    with Client(mnt) as c:
        got = c.call("memory_layout")
    oops = got["reserve_mem"]
    assert got == {"nodes": [{"start": 0, "end": 1 << 29}, {"start": 1 << 29, "end": 1 << 30}],
                   "reserve_mem": [{"name": "oops", "start": oops[0]["start"], "size": 4 << 20}],
                   "fdt_phys": None, "in_fdt_phys": None, "incoming": []}
    assert oops[0]["start"] % 4096 == 0 and oops[0]["start"] + (4 << 20) <= 1 << 30


def test_7x_after_kexec_out_from_the_root_page(mnt):
    """7.x shows out/fdt only after a cold boot; the map reads the live root FDT's page."""
    _mount(mnt, "--abi", "7.1", "--memory", "1G", "--cmdline", CMDLINE)
    assert khofs("kexec", mnt).returncode == 0
    assert not (mnt / "kho/out/fdt").exists()
    with Client(mnt) as c:
        lay = c.call("memory_layout")
        size = struct.unpack(">I", c.mem_read(lay["fdt_phys"] + 4, 4))[0]
        preserved = c.status()["preserved_bytes"]
    assert lay["in_fdt_phys"] not in (None, lay["fdt_phys"])
    r = khofs("map", mnt)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    at = lay["fdt_phys"]
    assert re.search(rf"\n  out/fdt +\[0x{at:012x}, 0x{at + size:012x}\) +{size} bytes\n", out)
    assert re.search(rf"\n  in/fdt +\[0x{lay['in_fdt_phys']:012x}, ", out)
    assert re.search(r"\n  order 10 +\[0x00003fc00000, 0x000040000000\) +4 MiB  1 block\(s\)\n",
                     out.split("preserved (in")[0])
    # What the page's map holds is all this kernel preserves: no note about a finalize.
    assert re.search(rf"  preserved \(out\):  [^\n]* \({preserved} bytes\) in 3 range\(s\)", out)
    assert out.rstrip().endswith("note: out/fdt is not in debugfs after a kexec (ABI 7.1); "
                                 "read from the root FDT's page")
    assert out.count("note: ") == 1
