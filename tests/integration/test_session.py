"""The user session from the issue, as shell commands, and the finalize cycle per ABI."""

import errno
import os
import re
import subprocess

import libfdt
import pytest

from khoit import ISSUE_ARGS, ISSUE_CMDLINE, read, sh, write_bytes

MiB = 1 << 20


def dtc(path):
    r = subprocess.run(["dtc", "-I", "dtb", "-O", "dts", str(path)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_issue_session(mount_khofs):
    m = mount_khofs(*ISSUE_ARGS, cmdline=ISSUE_CMDLINE)
    out = m.out

    r = sh(f"cd {out} && cat scratch_phys scratch_len finalize")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().split("\n")
    assert lines[-1] == ""
    phys_lines, rest = lines[:3], "\n".join(lines[3:])
    assert rest == "0x1000000\n0x4000000\n0x1000000\n0\n"
    assert all(re.fullmatch(r"0x[0-9a-f]+", p) for p in phys_lines), phys_lines
    low, glob, node = (int(p, 16) for p in phys_lines)
    # Top-down, adjacent, 2 MiB aligned, inside 1 GiB: lowmem highest, then global, then node.
    assert glob + 64 * MiB == low
    assert node + 16 * MiB == glob
    assert low + 16 * MiB <= 1 << 30
    assert all(a % (2 * MiB) == 0 for a in (low, glob, node))

    assert not os.path.exists(f"{out}/fdt")
    assert os.listdir(f"{out}/sub_fdts") == []

    r = sh(f"echo 1 > {out}/finalize")
    assert (r.returncode, r.stderr) == (0, "")
    assert read(f"{out}/finalize") == b"1\n"
    assert os.path.isfile(f"{out}/fdt")
    assert os.listdir(f"{out}/sub_fdts") == ["memblock"]

    root = dtc(f"{out}/fdt")
    assert 'compatible = "kho-v1";' in root
    assert "preserved-memory-map" in root
    assert "memblock {" in root
    assert "fdt = " in root

    sub = dtc(f"{out}/sub_fdts/memblock")
    assert 'compatible = "memblock-v1";' in sub
    assert re.search(r'oops \{[^}]*compatible = "reserve-mem-v1";', sub), sub
    # reserve_mem is allocated before scratch, above it (spec §10).
    fdt = libfdt.Fdt(read(f"{out}/sub_fdts/memblock"))
    node_off = fdt.path_offset("/oops")
    start = int.from_bytes(bytes(fdt.getprop(node_off, "start")), "little")
    size = int.from_bytes(bytes(fdt.getprop(node_off, "size")), "little")
    assert size == 4 * MiB
    assert start >= low + 16 * MiB and start % 4096 == 0

    r = sh(f"echo 1 > {out}/finalize")
    assert r.returncode == 1
    assert "write error: File exists" in r.stderr
    assert read(f"{out}/finalize") == b"1\n"

    r = sh(f"echo 0 > {out}/finalize; ls {out} {out}/sub_fdts")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == (f"{out}:\nfinalize\nscratch_len\nscratch_phys\nsub_fdts\n\n"
                                 f"{out}/sub_fdts:\n")
    assert not os.path.exists(f"{out}/fdt")
    assert read(f"{out}/finalize") == b"0\n"

    r = sh(f"echo 0 > {out}/finalize")
    assert r.returncode == 1
    assert "write error: No such file or directory" in r.stderr
    assert read(f"{out}/finalize") == b"0\n"


@pytest.mark.parametrize("abi", ["6.18", "6.16"])
def test_finalize_cycle_per_abi(mount_khofs, abi):
    m = mount_khofs("--abi", abi, *ISSUE_ARGS, cmdline=ISSUE_CMDLINE)
    fin = f"{m.out}/finalize"
    assert read(fin) == b"0\n"
    assert write_bytes(fin, b"1\0", os.O_RDWR) == 2
    assert read(fin) == b"1\n"
    assert sorted(os.listdir(m.out)) == ["fdt", "finalize", "scratch_len", "scratch_phys",
                                         "sub_fdts"]
    assert os.listdir(f"{m.out}/sub_fdts") == ["memblock"]
    assert read(f"{m.out}/fdt")[:4] == b"\xd0\x0d\xfe\xed"
    assert write_bytes(fin, b"1\n") == "EEXIST"
    assert write_bytes(fin, b"abc") == "EINVAL"
    assert write_bytes(fin, b"0\n") == 2
    assert read(fin) == b"0\n"
    assert not os.path.exists(f"{m.out}/fdt")
    assert os.listdir(f"{m.out}/sub_fdts") == []
    assert write_bytes(fin, b"0\n") == "ENOENT"
    # A second cycle works the same way.
    assert write_bytes(fin, b"1\n") == 2
    assert os.path.isfile(f"{m.out}/fdt")


def test_selftest_write(unfinalized):
    """tools/testing/selftests/kho/init.c: open O_RDWR, write "1\\0", expect 2."""
    fin = f"{unfinalized.out}/finalize"
    fd = os.open(fin, os.O_RDWR)
    try:
        assert os.write(fd, b"1\0") == 2
    finally:
        os.close(fd)
    assert read(fin) == b"1\n"
    fd = os.open(fin, os.O_RDWR)
    try:
        with pytest.raises(OSError) as ei:
            os.write(fd, b"1\0")
        assert ei.value.errno == errno.EEXIST
    finally:
        os.close(fd)
