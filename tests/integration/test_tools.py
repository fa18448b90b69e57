"""Everyday tools read the tree as they read debugfs."""

import os
import shutil
import subprocess

import pytest

from khoit import read, sh, write_bytes

FDT_MAGIC = b"\xd0\x0d\xfe\xed"


@pytest.fixture(scope="module")
def m(issue_mount):
    assert write_bytes(f"{issue_mount.out}/finalize", b"1") == 1
    return issue_mount


@pytest.fixture(scope="module")
def fdt_bytes(m):
    data = read(f"{m.out}/fdt")
    assert data[:4] == FDT_MAGIC
    assert len(data) == int.from_bytes(data[4:8], "big") == 196
    return data


def test_cat(m, fdt_bytes):
    r = sh(f"cat {m.out}/fdt")
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == fdt_bytes
    r = sh(f"cat {m.out}/finalize {m.out}/scratch_len")
    assert r.stdout == b"1\n0x1000000\n0x4000000\n0x1000000\n"


def test_busybox_cat(m, fdt_bytes):
    # busybox cat copies with sendfile(2), which reads only up to st_size.
    r = sh(f"busybox cat {m.out}/fdt {m.out}/finalize")
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == fdt_bytes + b"1\n"


@pytest.mark.parametrize("name", ["fdt", "sub_fdts/memblock", "scratch_phys", "finalize"])
def test_cp_identical_bytes(m, tmp_path, name):
    src = f"{m.out}/{name}"
    r = sh(f"cp {src} {tmp_path}/copy")
    assert (r.returncode, r.stderr) == (0, "")
    assert (tmp_path / "copy").read_bytes() == read(src)
    assert len(read(src)) > 0


def test_cp_a_tree(m, tmp_path, fdt_bytes):
    r = sh(f"cp -a {m.kho} {tmp_path}/")
    assert (r.returncode, r.stderr) == (0, "")
    dst = tmp_path / "kho" / "out"
    assert sorted(os.listdir(dst)) == ["fdt", "finalize", "scratch_len", "scratch_phys",
                                       "sub_fdts"]
    assert (dst / "fdt").read_bytes() == fdt_bytes
    assert (dst / "finalize").read_bytes() == b"1\n"
    assert (dst / "scratch_len").read_bytes() == b"0x1000000\n0x4000000\n0x1000000\n"
    assert (dst / "scratch_phys").read_bytes() == read(f"{m.out}/scratch_phys")
    assert os.listdir(dst / "sub_fdts") == ["memblock"]
    assert (dst / "sub_fdts" / "memblock").read_bytes() == read(f"{m.out}/sub_fdts/memblock")
    # -a keeps the modes.
    assert (dst / "finalize").stat().st_mode & 0o7777 == 0o600
    assert (dst / "fdt").stat().st_mode & 0o7777 == 0o400


def test_od_shows_magic(m):
    r = sh(f"od -An -tx1 {m.out}/fdt | head -1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[:4] == [b"d0", b"0d", b"fe", b"ed"]


def test_shutil_copyfile(m, tmp_path, fdt_bytes):
    # copyfile uses sendfile(2) on Linux.
    shutil.copyfile(f"{m.out}/fdt", tmp_path / "fdt")
    assert (tmp_path / "fdt").read_bytes() == fdt_bytes
    shutil.copyfile(f"{m.out}/finalize", tmp_path / "finalize")
    assert (tmp_path / "finalize").read_bytes() == b"1\n"


def test_sendfile_directly(m, tmp_path, fdt_bytes):
    with open(f"{m.out}/fdt", "rb") as src, open(tmp_path / "out", "wb") as dst:
        total = 0
        while True:
            n = os.sendfile(dst.fileno(), src.fileno(), None, 1 << 16)
            if n == 0:
                break
            total += n
    assert total == len(fdt_bytes)
    assert (tmp_path / "out").read_bytes() == fdt_bytes


def test_dd_bs1(m, tmp_path, fdt_bytes):
    r = sh(f"dd if={m.out}/fdt of={tmp_path}/dd bs=1 status=none")
    assert (r.returncode, r.stderr) == (0, "")
    assert (tmp_path / "dd").read_bytes() == fdt_bytes


def test_dd_finalize_bs1(m):
    r = sh(f"dd if={m.out}/finalize bs=1 status=none")
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == b"1\n"


def test_head_c_and_wc(m, fdt_bytes):
    r = sh(f"head -c 8 {m.out}/fdt | od -An -tx1")
    assert r.stdout.split() == [b"d0", b"0d", b"fe", b"ed", b"00", b"00", b"00", b"c4"]
    r = sh(f"wc -c < {m.out}/fdt")
    assert int(r.stdout) == len(fdt_bytes)


def test_dtc_reads_mount_directly(m):
    r = subprocess.run(["dtc", "-I", "dtb", "-O", "dts", f"{m.out}/sub_fdts/memblock"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert 'compatible = "memblock-v1";' in r.stdout
    assert "oops {" in r.stdout


def test_grep_and_xargs_over_tree(m):
    r = sh(f"grep -c . {m.out}/scratch_len {m.out}/finalize")
    assert r.stdout.decode().splitlines() == [f"{m.out}/scratch_len:3", f"{m.out}/finalize:1"]
    r = sh(f"find {m.kho} -type f | sort | xargs stat -c '%a %s %n'")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert [ln.split()[0] for ln in lines] == ["400", "600", "400", "400", "400"]
    assert [ln.split()[2].rsplit("/", 1)[1] for ln in lines] == [
        "fdt", "finalize", "scratch_len", "scratch_phys", "memblock"]
