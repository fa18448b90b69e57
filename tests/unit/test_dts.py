"""DTS text through the fdt package: compiled against dtc as the oracle, and refused with the
line at fault."""

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from khofs.devicetree.dts import DtsError, dts_to_dtb, normalize_value

CORPUS = Path(__file__).parent / "dts_corpus"
DTC = shutil.which("dtc")


def dtc_dts(blob: bytes) -> str:
    return subprocess.run([DTC, "-q", "-I", "dtb", "-O", "dts", "-"], input=blob,
                          capture_output=True, check=True).stdout.decode()


def dtc_dtb(path) -> bytes:
    return subprocess.run([DTC, "-q", "-I", "dts", "-O", "dtb", "-o", "-", str(path)],
                          capture_output=True, check=True).stdout


def test_dtc_is_the_oracle():
    assert DTC is not None, "the tests need dtc (device-tree-compiler) as the oracle"


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.dts")), ids=lambda p: p.name)
def test_corpus_matches_dtc(path):
    ours = dts_to_dtb(path.read_bytes())
    assert dtc_dts(ours) == dtc_dts(dtc_dtb(path))


def test_blob_is_compact_sequential_write():
    blob = dts_to_dtb('/dts-v1/;\n/ { compatible = "x-v1"; };\n')
    magic, total, off_struct, off_strings, off_rsv, version, last = struct.unpack_from(">7I", blob)
    assert (magic, total, version, last, off_rsv) == (0xD00DFEED, len(blob), 17, 16, 48)
    # FdtSw writes the strings block after the structure block, nothing after it.
    assert blob[off_strings:] == b"compatible\0"


def test_every_form_in_one_file():
    text = (CORPUS / "forms.dts").read_text()
    out = dtc_dts(dts_to_dtb(text))
    assert 'compatible = "kho-test-v1";\n\tmagic = <0x4b484f21>;' in out   # two on a line
    assert "start = <0x11223344 0x55667788 0x00 0x01>;" in out              # /bits/ 64
    assert "small = <0xff010002>;" in out                                   # /bits/ 8 and 16
    assert 'esc = "x\\ty\\\\zAA\\n";' in out
    assert "/memreserve/\t0x0000000000001000 0x0000000000002000;" in out


def test_normalize_value_forms():
    assert normalize_value("a", [("s", b"x\0"), ("s", b"y z\0")]) == 'a = "x", "y z";'
    # /bits/ 64 as its two big-endian 32-bit halves: the same bytes.
    assert normalize_value("b", [(64, bytes.fromhex("1122334455667788"))]) == \
        "b = <0x11223344 0x55667788>;"
    assert normalize_value("c", [(32, b"\0\0\0\1"), (64, bytes(8))]) == "c = <0x1 0x0 0x0>;"
    assert normalize_value("d", [("s", b"x\0"), (32, b"\0\0\0\1")]) == \
        "d = [78 00 00 00 00 01];"
    assert normalize_value("e", [("b", b"")]) == "e;"
    assert normalize_value("f", [("b", b"\xff")]) == "f = [ff];"


def test_unsafe_strings_become_bytes():
    for s in ("", "\\q", " lead", "semi;colon", "a//b", 'q\\"', "tab\\t"):
        blob = dts_to_dtb(f'/dts-v1/;\n/ {{ s = "{s}", "ok"; }};\n')
        ref = subprocess.run([DTC, "-q", "-I", "dts", "-O", "dtb", "-o", "-", "-"],
                             input=f'/dts-v1/;\n/ {{ s = "{s}", "ok"; }};\n'.encode(),
                             capture_output=True, check=True).stdout
        assert dtc_dts(blob) == dtc_dts(ref), s


BAD = [
    ("empty", "", 1, "empty"),
    ("only-comment", "// nothing\n", 2, "empty"),
    ("no-version", "/ { };\n", 1, "starts with /dts-v1/;"),
    ("syntax", '/dts-v1/;\n/ {\n\ta = "x"\n\tb = <1>;\n};\n', 4, "expected ';' or ','"),
    ("unterminated-node", '/dts-v1/;\n/ {\n\tn {\n\t\ta = <1>;\n};\n', 2, "not closed"),
    ("no-semicolon-after-brace", "/dts-v1/;\n/ {\n}\n", 3, "';' after '}'"),
    ("unknown-directive", "/dts-v1/;\n/ {\n};\n/delete-node/ n;\n", 4, "directive /delete-node/"),
    ("plugin", "/dts-v1/;\n/plugin/;\n/ { };\n", 2, "directive /plugin/"),
    ("label", "/dts-v1/;\n/ {\n\tl: n { };\n};\n", 3, "labels are not supported"),
    ("reference", "/dts-v1/;\n/ {\n\tp = <&l>;\n};\n", 3, "phandle references"),
    ("expression", "/dts-v1/;\n/ { a = <(1 + 2)>; };\n", 2, "expressions"),
    ("include", '#include "x.h"\n/dts-v1/;\n', 1, "#include"),
    ("cell-too-big", "/dts-v1/;\n/ {\n a = <0x100000000>;\n};\n", 3, "does not fit in 32 bits"),
    ("bits-width", "/dts-v1/;\n/ { a = /bits/ 12 <1>; };\n", 2, "/bits/ takes"),
    ("odd-bytes", "/dts-v1/;\n/ { a = [012]; };\n", 2, "pairs of hex digits"),
    ("unterminated-string", '/dts-v1/;\n/ { a = "x; };\n', 2, "unterminated string"),
    ("unterminated-comment", "/dts-v1/;\n/* x\n/ { };\n", 2, "unterminated /* comment"),
    ("prop-after-node", "/dts-v1/;\n/ {\n n { };\n a = <1>;\n};\n", 4, "must precede subnodes"),
    ("duplicate-prop", "/dts-v1/;\n/ {\n a;\n a;\n};\n", 4, "duplicate property 'a'"),
    ("duplicate-node", "/dts-v1/;\n/ {\n n { };\n n { };\n};\n", 4, "duplicate node 'n'"),
    ("second-root", "/dts-v1/;\n/ { };\n/ { };\n", 3, "second root"),
    ("bad-char", "/dts-v1/;\n/ { a = <1> $; };\n", 2, "unexpected character '$'"),
    ("trailing", "/dts-v1/;\n/ { };\nfoo;\n", 3, "expected end of file"),
]


@pytest.mark.parametrize("text,line,fragment", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_dts(text, line, fragment):
    with pytest.raises(DtsError) as ei:
        dts_to_dtb(text)
    msg = str(ei.value)
    assert ei.value.line == line and msg.startswith(f"line {line}: "), msg
    assert fragment in msg and "\n" not in msg, msg
    # dtc refuses each of these too (or, for labels and references, needs what khofs lacks).
    if "not supported" not in msg and "directive" not in msg and "#include" not in msg:
        r = subprocess.run([DTC, "-q", "-I", "dts", "-O", "dtb", "-o", "/dev/null", "-"],
                           input=text.encode(), capture_output=True)
        assert r.returncode != 0, text


def test_binary_garbage():
    for data, line in ((b"\x7fELF\x02\x01\x01\0", 1), (b"/dts-v1/;\n/ {\n\xff\xfe };", 3)):
        with pytest.raises(DtsError) as ei:
            dts_to_dtb(data)
        assert ei.value.line == line and "not DTS text" in str(ei.value)


def test_unsupported_forms_suggest_dtc():
    with pytest.raises(DtsError) as ei:
        dts_to_dtb("/dts-v1/;\n/ { l: n { }; };\n")
    assert "dtc -O dtb" in str(ei.value)
