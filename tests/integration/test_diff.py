"""khofs diff and dump --dts through a mount: what finalize, abort and kexec change, DTS out
without dtc, and bad DTS producers refused through the CLI with nothing registered."""

import os
import re
import shutil
import subprocess

import pytest

from khoit import KHOFS, khofs, read, write_bytes

CMDLINE = "kho=on reserve_mem=4M:4096:oops"
EXTRA = '/dts-v1/;\n/ {\n\tcompatible = "extra-v1";\n\tx = /bits/ 64 <5>;\n};\n'
ADDR = r"<0x[0-9A-F]+ 0x[0-9A-F]+>"


def save_out(m, dest):
    """A copy of out/fdt and out/sub_fdts/*, as a user would keep one with cp."""
    os.makedirs(os.path.join(dest, "sub_fdts"))
    shutil.copy(os.path.join(m.out, "fdt"), dest)
    for name in os.listdir(os.path.join(m.out, "sub_fdts")):
        shutil.copy(os.path.join(m.out, "sub_fdts", name), os.path.join(dest, "sub_fdts"))
    return str(dest)


def lines(r):
    assert "Traceback" not in r.stderr, r.stderr
    return r.stdout.splitlines()


def test_diff_shows_what_finalize_abort_changed(mount_khofs, tmp_path):
    m = mount_khofs(cmdline=CMDLINE)
    fin = os.path.join(m.out, "finalize")
    assert write_bytes(fin, b"1") == 1
    before = save_out(m, tmp_path / "before")
    r = khofs("diff", before, m.out)
    assert (r.returncode, r.stdout) == (0, "")
    assert write_bytes(fin, b"0") == 1
    r = khofs("diff", before, m.out)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"khofs: {m.out}: no fdt here (not a kho/out or kho/in directory)\n"
    src = tmp_path / "extra.dts"
    src.write_text(EXTRA)
    assert khofs("ctl", m.path, "subtree", "add", "extra", src).returncode == 0
    assert write_bytes(fin, b"1") == 1
    r = khofs("diff", before, m.out)
    assert r.returncode == 1
    got = lines(r)
    assert len(got) == 4, got
    assert re.fullmatch(f"~ fdt: /preserved-memory-map = {ADDR} -> {ADDR}", got[0]), got
    assert got[1] == "+ fdt: /extra/"
    assert re.fullmatch(f"\\+ fdt: /extra/fdt = {ADDR}", got[2]), got
    assert got[3] == "+ sub_fdts/extra"
    r = khofs("diff", "--ignore-addresses", before, m.out)
    assert r.returncode == 1 and lines(r) == got[1:]
    r = khofs("diff", f"{before}/sub_fdts/memblock", f"{m.out}/sub_fdts/extra")
    assert r.returncode == 1 and '~ /compatible = "memblock-v1" -> "extra-v1"' in lines(r)


def test_diff_across_a_kexec(mount_khofs, tmp_path):
    m = mount_khofs(cmdline=CMDLINE)
    assert write_bytes(os.path.join(m.out, "finalize"), b"1") == 1
    before = save_out(m, tmp_path / "before")
    assert khofs("kexec", m.path).returncode == 0
    inside = os.path.join(m.kho, "in")
    r = khofs("diff", before, inside)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    r = khofs("diff", f"{before}/fdt", f"{inside}/fdt")
    assert (r.returncode, r.stdout) == (0, "")
    # The next kernel hands over the same producers, placed anew.
    assert write_bytes(os.path.join(m.out, "finalize"), b"1") == 1
    r = khofs("diff", inside, m.out)
    assert r.returncode == 1
    got = lines(r)
    assert [g.split(" = ")[0] for g in got] == \
        ["~ fdt: /preserved-memory-map", "~ fdt: /memblock/fdt"], got
    r = khofs("diff", "--ignore-addresses", inside, m.out)
    assert (r.returncode, r.stdout) == (0, "")
    r = khofs("diff", "--json", "--ignore-addresses", inside, m.out)
    assert r.returncode == 0 and r.stdout == '{\n  "equal": true,\n  "changes": []\n}\n'


def test_diff_refuses_the_whole_tree(mount_khofs):
    m = mount_khofs()
    for p in (m.path, m.kho):
        r = khofs("diff", p, m.out)
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr == (f"khofs: {p}: holds both sides: name one side of the tree "
                            "(kho/out, kho/in, or a file in it)\n")


def dtc_dts(data: bytes) -> bytes:
    return subprocess.run(["dtc", "-q", "-I", "dtb", "-O", "dts", "-"], input=data,
                          capture_output=True, check=True).stdout


def dtc_from_text(text: str) -> bytes:
    dtb = subprocess.run(["dtc", "-q", "-I", "dts", "-O", "dtb", "-"], input=text.encode(),
                         capture_output=True, check=True).stdout
    return dtc_dts(dtb)


def test_dump_dts_without_dtc(mount_khofs, tmp_path):
    m = mount_khofs(cmdline=CMDLINE)
    src = tmp_path / "extra.dts"
    src.write_text(EXTRA)
    env = dict(os.environ, PATH="/nonexistent")       # no dtc
    run = lambda *a: subprocess.run(KHOFS + list(map(str, a)), capture_output=True, text=True,
                                    env=env, timeout=30)
    assert run("ctl", m.path, "subtree", "add", "extra", src).returncode == 0
    assert write_bytes(os.path.join(m.out, "finalize"), b"1") == 1
    assert sorted(os.listdir(os.path.join(m.out, "sub_fdts"))) == ["extra", "memblock"]
    r = run("dump", "--dts", m.path)
    assert r.returncode == 0 and r.stderr == ""
    parts = re.split(r"^// (/\S+)\n", r.stdout, flags=re.M)
    assert parts[0] == ""
    files = dict(zip(parts[1::2], parts[2::2]))
    assert sorted(files) == [f"{m.out}/fdt", f"{m.out}/sub_fdts/extra",
                             f"{m.out}/sub_fdts/memblock"]
    for path, text in files.items():
        assert text.startswith("/dts-v1/;\n")
        assert dtc_from_text(text) == dtc_dts(read(path)), path
    assert 'compatible = "extra-v1";' in files[f"{m.out}/sub_fdts/extra"]
    r = run("dump", "--dts", f"{m.out}/sub_fdts/extra")
    assert r.returncode == 0 and r.stdout == files[f"{m.out}/sub_fdts/extra"].rstrip("\n") + "\n"


def test_truncated_7_1_out_fdt(mount_khofs, tmp_path):
    m = mount_khofs("--abi", "7.1")
    src = tmp_path / "extra.dts"
    src.write_text(EXTRA)
    assert khofs("ctl", m.path, "subtree", "add", "extra", src).returncode == 0
    f = os.path.join(m.out, "fdt")
    data = read(f)
    total = int.from_bytes(data[4:8], "big")
    assert total > len(data)
    # dump completes it from the root FDT's page, as khofs map does
    r = khofs("dump", m.path)
    assert r.returncode == 0 and "Traceback" not in r.stderr
    assert f"note: out/fdt shows {len(data)} of the FDT's {total} bytes (a 7.1 kernel sizes " \
        "it once, when it makes the file); the rest read from the root FDT's page" \
        in r.stdout.splitlines(), r.stdout
    assert f"{f}: FDT kho-v3, {total} bytes" in r.stdout.splitlines()
    assert "  extra {" in r.stdout.splitlines()
    r = khofs("dump", "--dts", f)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == f"khofs: {f}: truncated FDT: its header says {total} bytes, " \
                       f"{len(data)} read (a 7.1 kernel sizes out/fdt once, when it makes the file)\n"
    r = khofs("diff", f, f)
    assert r.returncode == 2 and r.stderr.count("\n") == 1


BAD_DTS = [
    ("empty", b"", "line 1: empty"),
    ("binary", b"\x7fELF\x02\x01\x01\x00garbage", "line 1: not DTS text"),
    ("unterminated", b"/dts-v1/;\n/ {\n  a = <1>;\n  n {\n", "line 4: node 'n' is not closed"),
    ("unknown-directive", b"/dts-v1/;\n/plugin/;\n/ { };\n", "line 2: "),
]


@pytest.mark.parametrize("data,fragment", [b[1:] for b in BAD_DTS], ids=[b[0] for b in BAD_DTS])
def test_bad_dts_producer_via_cli(mount_khofs, tmp_path, data, fragment):
    m = mount_khofs()
    src = tmp_path / "bad.dts"
    src.write_bytes(data)
    for args, where in (([src], str(src)), (["-"], "stdin")):
        r = subprocess.run(KHOFS + ["ctl", m.path, "subtree", "add", "bad"] + list(map(str, args)),
                           input=data, capture_output=True, timeout=30)
        err = r.stderr.decode()
        assert r.returncode == 1 and r.stdout == b"", err
        assert err.startswith(f"khofs: {where}: {fragment}") and err.count("\n") == 1, err
    r = khofs("ctl", m.path, "subtree", "list")
    assert (r.returncode, r.stdout) == (0, "")
    assert khofs("ctl", m.path, "log").returncode == 0
    assert write_bytes(os.path.join(m.out, "finalize"), b"1") == 1
    assert os.listdir(os.path.join(m.out, "sub_fdts")) == []
