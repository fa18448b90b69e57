"""khofs diff and DTS out on the fdt package: the changes found, address masking, the one-line
errors, and DTS text checked against dtc as the oracle."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import fdt
import pytest

from khofs.devicetree.dts import dts_to_dtb
from khofs.devicetree.diff import (DiffError, diff_paths, diff_trees, dts_text, parse, read_side,
                           render)

CORPUS = Path(__file__).parent / "dts_corpus"
DTC = shutil.which("dtc")

BASE = """/dts-v1/;
/memreserve/ 0x1000 0x2000;
/ {
    compatible = "kho-v1";
    preserved-memory-map = /bits/ 64 <0x100000>;
    memblock {
        fdt = /bits/ 64 <0x200000>;
        names = "a", "b";
        flag;
        raw = [01 02];
    };
};
"""


def blob(text: str) -> bytes:
    return dts_to_dtb(text)


def tree(text: str):
    return parse(blob(text), "t")


def changes(a: str, b: str, **kw):
    return render(diff_trees(tree(a), tree(b), **kw))


def test_equal_trees_have_no_changes():
    assert diff_trees(tree(BASE), tree(BASE)) == []


def test_property_changed_added_removed():
    b = BASE.replace("<0x100000>", "<0x300000>").replace('"a", "b"', '"a", "c"') \
        .replace("flag;", "new = <7>;")
    assert changes(BASE, b) == [
        "~ /preserved-memory-map = <0x0 0x100000> -> <0x0 0x300000>",
        "- /memblock/flag",
        '~ /memblock/names = "a", "b" -> "a", "c"',
        "+ /memblock/new = <0x7>",
    ]


def test_nodes_added_and_removed_with_their_properties():
    b = BASE.replace("    memblock {", "    extra {\n        x = [ff];\n        deep { };\n    };\n"
                     "    memblock {")
    assert changes(BASE, b) == ["+ /extra/", "+ /extra/x = [FF]", "+ /extra/deep/"]
    assert changes(b, BASE) == ["- /extra/", "- /extra/x = [FF]", "- /extra/deep/"]


def test_reserve_map_entries():
    b = BASE.replace("/memreserve/ 0x1000 0x2000;", "/memreserve/ 0x8000 0x1000;")
    assert changes(BASE, b) == ["- /memreserve/ 0x1000 0x2000", "+ /memreserve/ 0x8000 0x1000"]


def test_each_tree_keeps_its_own_reserve_map():
    # fdt 0.3.3 shares one default list between FDT objects; each parse must not see another's.
    a = tree(BASE)
    b = tree(BASE.replace("/memreserve/ 0x1000 0x2000;\n", ""))
    c = tree(BASE)
    assert a.entries == [{"address": 0x1000, "size": 0x2000}] == c.entries
    assert b.entries == []
    assert fdt.FDT().entries == []
    diff_trees(a, b)
    assert fdt.FDT().entries == []


RESV = """/dts-v1/;
/ {
    compatible = "memblock-v1";
    r1 { compatible = "reserve-mem-v1"; start = /bits/ 64 <0x1000>; size = /bits/ 64 <0x4000>; };
    other { start = <5>; };
};
"""


def test_ignore_addresses_masks_only_address_properties():
    moved = BASE.replace("<0x100000>", "<0x300000>").replace("<0x200000>", "<0x400000>")
    assert len(changes(BASE, moved)) == 2
    assert changes(BASE, moved, ignore_addresses=True) == []
    v3 = BASE.replace("fdt = ", "preserved-data = ")
    assert changes(v3, v3.replace("<0x200000>", "<0x9000>"), ignore_addresses=True) == []
    b = RESV.replace("<0x1000>", "<0x2000>").replace("<5>", "<6>")
    assert changes(RESV, b, ignore_addresses=True) == ["~ /other/start = <0x5> -> <0x6>"]
    # A size is not an address; an added node is not a move.
    b = RESV.replace("<0x4000>", "<0x8000>")
    assert changes(RESV, b, ignore_addresses=True) == \
        ["~ /r1/size = <0x0 0x4000> -> <0x0 0x8000>"]
    b = BASE.replace("    memblock {", "    extra { fdt = /bits/ 64 <1>; };\n    memblock {")
    assert changes(BASE, b, ignore_addresses=True) == ["+ /extra/", "+ /extra/fdt = <0x0 0x1>"]


def test_change_records():
    b = BASE.replace("<0x100000>", "<0x300000>")
    assert diff_trees(tree(BASE), tree(b)) == [{
        "change": "changed", "kind": "property", "path": "/",
        "property": "preserved-memory-map", "old": "<0x0 0x100000>", "new": "<0x0 0x300000>"}]


def side(root: Path, fdt_text: str, subs: dict) -> Path:
    root.mkdir()
    (root / "fdt").write_bytes(blob(fdt_text))
    (root / "sub_fdts").mkdir()
    for name, data in subs.items():
        (root / "sub_fdts" / name).write_bytes(data)
    return root


def test_directories_compare_fdt_and_each_sub_blob(tmp_path):
    a = side(tmp_path / "a", BASE, {"memblock": blob(RESV), "gone": blob(RESV),
                                    "kexec-metadata": b"\1\0\0\0" + b"x" * 69})
    b = side(tmp_path / "b", BASE, {"memblock": blob(RESV.replace("<5>", "<6>")),
                                    "new": b"raw", "kexec-metadata": b"\1\0\0\0" + b"y" * 69})
    assert render(diff_paths(str(a), str(b))) == [
        "- sub_fdts/gone",
        "~ sub_fdts/kexec-metadata (73 bytes -> 73 bytes)",
        "~ sub_fdts/memblock: /other/start = <0x5> -> <0x6>",
        "+ sub_fdts/new",
    ]
    assert diff_paths(str(a), str(a)) == []
    # A file against a directory compares the directory's fdt.
    assert diff_paths(str(a / "fdt"), str(b)) == []


def test_read_side_refuses_a_whole_tree(tmp_path):
    (tmp_path / "kho" / "out").mkdir(parents=True)
    for p in (tmp_path, tmp_path / "kho"):
        with pytest.raises(DiffError, match="name one side of the tree"):
            read_side(str(p))
    with pytest.raises(DiffError, match="no fdt here"):
        read_side(str(tmp_path / "kho" / "out"))


GOOD = blob(BASE)
BAD = [
    ("empty", b"", "not an FDT (FDT_ERR_TRUNCATED)"),
    ("garbage", b"\x7fELF" + bytes(60), "not an FDT (FDT_ERR_BADMAGIC)"),
    ("truncated", GOOD[:-8], f"truncated FDT: its header says {len(GOOD)} bytes, "
                             f"{len(GOOD) - 8} read"),
    ("bad-struct", GOOD[:40] + b"\xff" * (len(GOOD) - 40), "not an FDT (FDT_ERR_"),
]


@pytest.mark.parametrize("data,msg", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_not_an_fdt(tmp_path, data, msg):
    f = tmp_path / "x.dtb"
    f.write_bytes(data)
    with pytest.raises(DiffError) as ei:
        diff_paths(str(f), str(f))
    assert str(ei.value).startswith(f"{f}: {msg}"), str(ei.value)
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize("compat,abi", [("kho-v1", "7.0"), ("kho-v3", "7.1")])
def test_truncated_out_fdt_names_the_release_that_sizes_it(tmp_path, compat, abi):
    (tmp_path / "out").mkdir()
    f = tmp_path / "out" / "fdt"
    blob = dts_to_dtb(f'/dts-v1/;\n/ {{ compatible = "{compat}"; a {{ }}; }};\n')
    f.write_bytes(blob[:-8])
    with pytest.raises(DiffError, match=rf"read \(a {abi} kernel sizes out/fdt once, when it "
                       r"makes the file\)$"):
        parse(f.read_bytes(), str(f))


def run(*args):
    return subprocess.run([sys.executable, "-m", "khofs", *map(str, args)],
                          capture_output=True, text=True, timeout=30)


def test_cli_exit_status_and_json(tmp_path):
    a, b, bad = tmp_path / "a.dtb", tmp_path / "b.dtb", tmp_path / "bad"
    a.write_bytes(GOOD)
    b.write_bytes(blob(BASE.replace("<0x100000>", "<0x300000>")))
    bad.write_bytes(b"not a blob")
    r = run("diff", a, a)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    r = run("diff", a, b)
    assert r.returncode == 1 and r.stderr == ""
    assert r.stdout == "~ /preserved-memory-map = <0x0 0x100000> -> <0x0 0x300000>\n"
    assert run("diff", "--ignore-addresses", a, b).returncode == 0
    r = run("diff", "--json", a, b)
    assert r.returncode == 1
    assert json.loads(r.stdout) == {"equal": False, "changes": [{
        "blob": None, "change": "changed", "kind": "property", "path": "/",
        "property": "preserved-memory-map", "old": "<0x0 0x100000>", "new": "<0x0 0x300000>"}]}
    assert json.loads(run("diff", "--json", a, a).stdout) == {"equal": True, "changes": []}
    for args in ((a, bad), (tmp_path / "none", a)):
        r = run("diff", *args)
        assert r.returncode == 2 and r.stdout == "", r
        assert r.stderr.startswith("khofs: ") and len(r.stderr.splitlines()) == 1, r.stderr


def dtc_dts(data: bytes) -> bytes:
    return subprocess.run([DTC, "-q", "-I", "dtb", "-O", "dts", "-"], input=data,
                          capture_output=True, check=True).stdout


def dtc_dtb(text: str) -> bytes:
    return subprocess.run([DTC, "-q", "-I", "dts", "-O", "dtb", "-"], input=text.encode(),
                          capture_output=True, check=True).stdout


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.dts")), ids=lambda p: p.name)
def test_dts_out_compiles_back_to_the_same_tree(path):
    assert DTC, "the tests need dtc (device-tree-compiler) as the oracle"
    ours = dts_to_dtb(path.read_bytes())
    text = dts_text(ours, str(path))
    assert dtc_dts(dtc_dtb(text)) == dtc_dts(ours)


def test_dts_out_of_a_kernel_made_blob():
    from khofs.kernel.machine import Machine, MachineConfig
    m = Machine("kho=on reserve_mem=4M:4096:oops", MachineConfig(memory=1 << 30))
    m.kho_out.set_finalize(1)
    blobs = [m.kho_out.root_fdt()] + \
        [m.mem.read(b.phys, b.size) for b in m.kho_out.blobs("sub_fdts")]
    assert len(blobs) == 2
    for b in blobs:
        text = dts_text(bytes(b), "kernel")
        assert text.startswith("/dts-v1/;\n")
        assert dtc_dts(dtc_dtb(text)) == dtc_dts(bytes(b))
