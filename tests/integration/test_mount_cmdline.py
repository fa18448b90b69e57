"""What the kernel command line makes of the tree (§1, §6, §10)."""

import os
import re

import pytest

from khoit import read, write_bytes

MiB = 1 << 20


@pytest.mark.parametrize("cmdline", ["kho=off", "", "kho=n", "kho=0", "kho=of",
                                     "reserve_mem=4M:4096:oops", "kho"])
def test_no_kho_tree_without_kho_on(mount_khofs, cmdline):
    m = mount_khofs("--memory", "1G", cmdline=cmdline)
    assert os.listdir(m.path) == []
    assert not os.path.exists(m.kho)
    assert os.stat(m.path).st_mode & 0o7777 == 0o700


@pytest.mark.parametrize("cmdline", ["kho=on", "kho=1", "kho=y", "kho=Yes", "kho=ON"])
def test_kho_tree_with_kho_on(mount_khofs, cmdline):
    m = mount_khofs("--memory", "1G", cmdline=cmdline)
    assert os.listdir(m.path) == ["kho"]
    assert os.listdir(m.out) == ["finalize", "scratch_len", "scratch_phys", "sub_fdts"]


def test_malformed_kho_scratch_uses_default(mount_khofs):
    bad = mount_khofs("--memory", "1G", cmdline="kho=on kho_scratch=bogus", name="bad")
    assert bad.result.returncode == 0
    assert "Malformed early option 'kho_scratch'" in bad.result.stderr
    default = mount_khofs("--memory", "1G", cmdline="kho=on", name="default")
    assert "Malformed" not in default.result.stderr
    assert read(f"{bad.out}/scratch_len") == read(f"{default.out}/scratch_len")
    assert read(f"{bad.out}/scratch_phys") == read(f"{default.out}/scratch_phys")
    # Default scale 200% of the 64 MiB the kernel reserved below 4 GiB: lowmem 128 MiB;
    # every boot reservation is low, so global is 0 (still listed) (§6, §10).
    lines = read(f"{bad.out}/scratch_len").decode().splitlines()
    assert len(lines) == 3
    assert lines[0] == "0x8000000"
    assert lines[1] == "0x0"
    assert re.fullmatch(r"0x[0-9a-f]+", lines[2]) and int(lines[2], 16) % (2 * MiB) == 0


def test_scratch_too_big_disables_kho(mount_khofs):
    m = mount_khofs("--memory", "1G", cmdline="kho=on kho_scratch=100G,1G,1G")
    assert m.result.returncode == 0
    assert "Failed to reserve scratch area, disabling kexec handover" in m.result.stderr
    assert os.listdir(m.path) == []


def test_two_numa_nodes_four_scratch_lines(mount_khofs):
    m = mount_khofs("--memory", "2G", "--nodes", "2",
                    cmdline="kho=on kho_scratch=16M,64M,16M")
    assert read(f"{m.out}/scratch_len") == b"0x1000000\n0x4000000\n0x1000000\n0x1000000\n"
    phys = [int(x, 16) for x in read(f"{m.out}/scratch_phys").decode().split()]
    assert len(phys) == 4 and all(p % (2 * MiB) == 0 for p in phys)
    # Each node's region lies within that node (1 GiB each).
    assert phys[2] + 16 * MiB <= 1 << 30
    assert (1 << 30) <= phys[3] and phys[3] + 16 * MiB <= 2 << 30


def test_scratch_zero_allowed_if_sum_nonzero_618(mount_khofs):
    m = mount_khofs("--memory", "1G", cmdline="kho=on kho_scratch=0,64M,0")
    assert read(f"{m.out}/scratch_len") == b"0x0\n0x4000000\n0x0\n"


def test_scratch_zero_rejected_616(mount_khofs):
    m = mount_khofs("--memory", "1G", "--abi", "6.16", cmdline="kho=on kho_scratch=0,64M,0")
    assert "Malformed early option 'kho_scratch'" in m.result.stderr
    default = mount_khofs("--memory", "1G", "--abi", "6.16", cmdline="kho=on", name="default")
    assert read(f"{m.out}/scratch_len") == read(f"{default.out}/scratch_len")


def test_reserve_mem_two_regions(mount_khofs):
    m = mount_khofs("--memory", "1G",
                    cmdline="kho=on reserve_mem=4M:4096:oops reserve_mem=1M:64:trace")
    assert write_bytes(f"{m.out}/finalize", b"1") == 1
    sub = read(f"{m.out}/sub_fdts/memblock")
    assert b"oops\0" in sub and b"trace\0" in sub
    assert os.listdir(f"{m.out}/sub_fdts") == ["memblock"]


@pytest.mark.parametrize("abi,expect", [
    ("6.18", None),                                          # strict: malformed, default
    ("6.16", b"0x1000000\n0x4000000\n0x1000000\n"),          # lenient: trailing text ignored
])
def test_kho_scratch_trailing_text(mount_khofs, abi, expect):
    m = mount_khofs("--memory", "1G", "--abi", abi, cmdline="kho=on kho_scratch=16M,64M,16Mxyz")
    if expect is None:
        assert "Malformed early option 'kho_scratch'" in m.result.stderr
        assert read(f"{m.out}/scratch_len").startswith(b"0x8000000\n0x0\n")
    else:
        assert "Malformed" not in m.result.stderr
        assert read(f"{m.out}/scratch_len") == expect


def test_kho_scratch_explicit_rounding(mount_khofs):
    # Explicit lowmem and global sizes are taken as given; the per-node size is rounded to 2 MiB.
    m = mount_khofs("--memory", "1G", cmdline="kho=on kho_scratch=1M,3M,1M")
    assert read(f"{m.out}/scratch_len") == b"0x100000\n0x300000\n0x200000\n"
    assert all(int(p, 16) % (2 * MiB) == 0 for p in read(f"{m.out}/scratch_phys").split())


def test_kho_scratch_percentage(mount_khofs):
    m = mount_khofs("--memory", "1G", cmdline="kho=on kho_scratch=50%")
    assert read(f"{m.out}/scratch_len").startswith(b"0x2000000\n0x0\n")


def test_last_kho_option_wins(mount_khofs):
    off = mount_khofs("--memory", "1G", cmdline="kho=on kho=off", name="off")
    on = mount_khofs("--memory", "1G", cmdline="kho=off kho=on", name="on")
    assert os.listdir(off.path) == []
    assert os.listdir(on.path) == ["kho"]
