"""The 7.0 and 7.1 profiles through a real mount (KHO-SPEC §9, docs/abi-profiles.md): the tree a
shell sees on a cold boot, every write's errno, a three-kernel 7.1 chain with its
kexec-metadata count, and each row of the cross-release table."""

import json
import os
import stat
import struct
import subprocess

import pytest

from abi_cross import CROSS
from khofs.kernel.profile import PROFILES
from khoit import khofs_bytes as khofs
from khoit import read, write_bytes

PAGE = 4096
CMDLINE = "kho=on reserve_mem=1M:4096:test_resv khofs.test_kho=1"
FOUND = {"6.16": "KHO: found kexec handover data. Will skip init for some devices",
         "6.18": "KHO: found kexec handover data. Will skip init for some devices",
         "7.0": "KHO: found kexec handover data.", "7.1": "KHO: found kexec handover data.",
         "7.2": "KHO: found kexec handover data.", "7.4": "KHO: found kexec handover data."}


def sh(cmd):
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=30)


def status(mnt):
    return json.loads(khofs("status", mnt, "--json").stdout)


def listing(kho):
    """(path, type and mode, nlink, st_size) of everything under kho/, sorted."""
    out = []
    for root, dirs, files in os.walk(kho):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            out.append((os.path.relpath(p, kho), stat.filemode(st.st_mode), st.st_nlink,
                        st.st_size))
    return sorted(out)


def kexec(mnt, *args):
    r = khofs("kexec", mnt, *args)
    return [line for line in r.stdout.decode().splitlines() if "scratch areas" not in line]


def payload(mnt, tmp_path, size=2 * PAGE, tag=b"handed over"):
    data = (tag * (size // len(tag) + 1))[:size]
    f = tmp_path / f"payload-{tag.hex()}.bin"
    f.write_bytes(data)
    phys = int(khofs("ctl", mnt, "mem", "alloc", size).stdout, 0)
    khofs("ctl", mnt, "mem", "write", hex(phys), f)
    khofs("ctl", mnt, "preserve", hex(phys), size)
    return phys, data


def mem_read(mnt, phys, size):
    return khofs("ctl", mnt, "mem", "read", hex(phys), size).stdout


def fdt_totalsize(path):
    return struct.unpack(">I", read(path)[4:8])[0]


# -- cold boot: what a shell sees -----------------------------------------------------------
DIRS = [("out", "drwxr-xr-x", 3, 0), ("out/sub_fdts", "drwxr-xr-x", 2, 0)]
COLD = {
    # 7.0: out/fdt made at kho_init before any producer registered (152 of 228 bytes).
    "7.0": DIRS + [("out/fdt", "-r--------", 1, 152), ("out/finalize", "-rw-------", 1, 2),
                   ("out/scratch_len", "-r--------", 1, 25),
                   ("out/scratch_phys", "-r--------", 1, 33),
                   ("out/sub_fdts/kho_test", "-r--------", 1, 240),
                   ("out/sub_fdts/memblock", "-r--------", 1, 214)],
    # 7.1 as seen on 7.1.5: no finalize; out/fdt 233 of 353 bytes; kexec-metadata 73.
    "7.1": DIRS + [("out/fdt", "-r--------", 1, 233), ("out/scratch_len", "-r--------", 1, 25),
                   ("out/scratch_phys", "-r--------", 1, 33),
                   ("out/sub_fdts/kexec-metadata", "-r--------", 1, 73),
                   ("out/sub_fdts/kho_test", "-r--------", 1, 240),
                   ("out/sub_fdts/memblock", "-r--------", 1, 214)],
}
HEADER_SIZE = {"7.0": 228, "7.1": 353}


@pytest.mark.parametrize("abi", ["7.0", "7.1"])
def test_cold_boot_tree(mount_khofs, abi):
    m = mount_khofs("--abi", abi, "--memory", "1G", cmdline=CMDLINE)
    ref = mount_khofs("--abi", "6.18", "--memory", "1G", cmdline=CMDLINE, name="ref")
    assert listing(m.kho) == sorted(COLD[abi])
    assert os.stat(m.kho).st_nlink == 3 and not os.path.exists(os.path.join(m.kho, "in"))
    assert fdt_totalsize(os.path.join(m.out, "fdt")) == HEADER_SIZE[abi]
    # The scratch areas do not depend on the release.
    for name in ("scratch_phys", "scratch_len"):
        assert read(os.path.join(m.out, name)) == read(os.path.join(ref.out, name))
    st = status(m.path)
    assert (st["abi"], st["release"]) == (abi, f"{abi}.0-khofs")
    assert st["finalized"] == (False if abi == "7.0" else None)
    if abi == "7.1":
        md = read(os.path.join(m.out, "sub_fdts", "kexec-metadata"))
        assert md == struct.pack("<I", 1) + b"7.1.0-khofs".ljust(65, b"\0") + struct.pack("<I", 1)


def test_70_finalize_writes(mount_khofs):
    m = mount_khofs("--abi", "7.0", "--memory", "1G", cmdline=CMDLINE)
    fin = os.path.join(m.out, "finalize")
    assert read(fin) == b"0\n"
    assert write_bytes(fin, b"0") == "EINVAL"          # 0 is EINVAL in every state
    assert write_bytes(fin, b"abc") == "EINVAL"
    assert write_bytes(fin, b"18446744073709551616") == "ERANGE"
    before = read(os.path.join(m.out, "fdt"))
    assert write_bytes(fin, b"1\n") == 2
    assert read(fin) == b"1\n"
    assert read(os.path.join(m.out, "fdt")) != before   # the map's address written in place
    assert write_bytes(fin, b"1") == 1                  # a refresh, never EEXIST
    assert write_bytes(fin, b"7") == 1
    assert write_bytes(fin, b"0") == "EINVAL"           # never back to 0
    assert read(fin) == b"1\n"
    r = sh(f"echo 0 > {fin}")
    assert r.returncode == 1 and "write error: Invalid argument" in r.stderr


@pytest.mark.parametrize("abi", ["7.0", "7.1"])
def test_other_writes(mount_khofs, abi):
    m = mount_khofs("--abi", abi, "--memory", "1G", cmdline=CMDLINE)
    before = listing(m.kho)
    for name in ("scratch_phys", "scratch_len"):
        assert write_bytes(os.path.join(m.out, name), b"1") == "EINVAL"
    r = sh(f"echo 1 > {m.out}/finalize")
    if abi == "7.1":
        # No finalize file: the shell's O_CREAT is refused as on debugfs.
        assert r.returncode == 1 and "Permission denied" in r.stderr
    else:
        assert r.returncode == 0
    assert "Permission denied" in sh(f"touch {m.out}/new").stderr
    assert "Operation not permitted" in sh(f"mkdir {m.out}/d").stderr
    assert "Operation not permitted" in sh(f"rm {m.out}/scratch_len").stderr
    after = listing(m.kho)
    if abi == "7.1":
        assert after == before
    assert not os.path.exists(f"{m.out}/new") and not os.path.exists(f"{m.out}/d")


# -- 7.1: a chain of three kernels ------------------------------------------------------------
def test_71_three_kernel_chain(mount_khofs, tmp_path):
    m = mount_khofs("--abi", "7.1", "--release", "7.1.5", "--memory", "1G",
                    cmdline="kho=on reserve_mem=1M:4096:test_resv")
    phys, data = payload(m.path, tmp_path, 3 * PAGE)
    assert kexec(m.path, "--release", "7.1.5") == [
        "KHO: found kexec handover data.",
        "Revived memory reservation 'test_resv' from KHO",
        "KHO: exec from: 7.1.5 (count 1)"]
    assert mem_read(m.path, phys, 3 * PAGE) == data
    # After a KHO kexec there is no out/fdt; in/ holds what was handed over.
    assert not os.path.exists(os.path.join(m.out, "fdt"))
    assert os.stat(m.kho).st_nlink == 4
    assert sorted(os.listdir(os.path.join(m.kho, "in", "sub_fdts"))) == \
        ["kexec-metadata", "memblock"]
    md_in = read(os.path.join(m.kho, "in", "sub_fdts", "kexec-metadata"))
    assert md_in == struct.pack("<I", 1) + b"7.1.5".ljust(65, b"\0") + struct.pack("<I", 1)
    md_out = read(os.path.join(m.out, "sub_fdts", "kexec-metadata"))
    assert md_out[69:] == struct.pack("<I", 2)
    phys2, data2 = payload(m.path, tmp_path, PAGE, tag=b"second kernel")
    assert "KHO: exec from: 7.1.5 (count 2)" in kexec(m.path, "--release", "7.1.6")
    assert mem_read(m.path, phys2, PAGE) == data2
    st = status(m.path)
    assert st["kexec_metadata"] == {"previous_release": "7.1.5", "kexec_count": 2}
    assert (st["release"], st["kexec_count"]) == ("7.1.6", 2)
    md_out = read(os.path.join(m.out, "sub_fdts", "kexec-metadata"))
    assert md_out[4:10] == b"7.1.6\0" and md_out[69:] == struct.pack("<I", 3)


# -- kexec from one release into another, each row of docs/abi-profiles.md's table -------------


@pytest.mark.parametrize("src,dst", list(CROSS), ids=[f"{s}-to-{d}" for s, d in CROSS])
def test_cross_release_kexec_through_a_mount(mount_khofs, tmp_path, src, dst):
    accepted, map_ok, rejection = CROSS[(src, dst)]
    m = mount_khofs("--abi", src, "--memory", "1G",
                    cmdline="kho=on reserve_mem=1M:4096:test_resv")
    phys, data = payload(m.path, tmp_path)
    if os.path.exists(os.path.join(m.out, "finalize")):
        assert write_bytes(os.path.join(m.out, "finalize"), b"1") == 1
    lines = kexec(m.path, "--abi", dst)
    st = status(m.path)
    assert (st["abi"], st["release"], st["kexec_count"]) == (dst, f"{dst}.0-khofs", 1)
    assert os.path.isdir(os.path.join(m.kho, "in")) == accepted == st["kho_in"]
    if accepted:
        assert lines[0] == FOUND[dst]
        assert "Revived memory reservation 'test_resv' from KHO" in lines
        clean = not any(t.startswith(("khofs:", "KHO: failed")) for t in lines)
        assert clean == map_ok, lines
        if map_ok:
            assert mem_read(m.path, phys, len(data)) == data
        assert (f"KHO: exec from: {src}.0-khofs (count 1)" in lines) == \
            PROFILES[dst].kexec_metadata
    else:
        want, revival = rejection
        assert lines[0].startswith("KHO: setup: handover FDT (0x")
        assert lines[0].endswith(f"is incompatible with '{want}': 1")
        assert lines[1] == revival
        # Nothing was preserved: the memory is free (zeros, or the new kernel's own data).
        assert mem_read(m.path, phys, len(data)) != data


def test_71_subtree_add_takes_any_bytes(mount_khofs, tmp_path):
    """kho-v3 hands over blobs of any format: `khofs ctl subtree add` sends a file that is
    neither an FDT nor DTS as it is on 7.1, and refuses it, naming why, before 7.1."""
    raw = tmp_path / "raw.bin"
    raw.write_bytes(b"raw\0bytes\xff" * 3)
    m = mount_khofs("--abi", "7.1", "--memory", "1G")
    khofs("ctl", m, "subtree", "add", "rawb", raw)
    assert read(os.path.join(m.out, "sub_fdts", "rawb")) == raw.read_bytes()
    m = mount_khofs("--memory", "1G", name="m618")
    r = khofs("ctl", m, "subtree", "add", "rawb", raw, check=False)
    assert r.returncode == 1
    assert r.stderr == f"khofs: {raw}: line 1: not DTS text (binary byte 0xff); a .dtb starts " \
        "with d00dfeed\n".encode()
