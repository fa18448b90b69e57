"""Profiles through a mount: 7.2's kho-v4 and 7.4's boot memory as a shell sees them, the
release picking the kernel for mount and kexec, --abi against --release, and a profile that
only the test defines served and kexec'ed by the real daemon."""

import json
import os
import stat
import struct
import subprocess
import sys
import textwrap

import pytest

from khoit import is_mounted, read
from khoit import khofs_bytes as khofs

PAGE = 4096


def status(mnt):
    return json.loads(khofs("status", mnt, "--json").stdout)


def kexec(mnt, *args):
    r = khofs("kexec", mnt, *args)
    return [line for line in r.stdout.decode().splitlines() if "scratch areas" not in line]


def out_listing(m):
    return sorted((n, stat.filemode(os.stat(os.path.join(m.out, n)).st_mode))
                  for n in os.listdir(m.out))


def compatible(path):
    dts = subprocess.run(["dtc", "-I", "dtb", "-O", "dts", path], capture_output=True,
                         text=True, check=True).stdout
    return [line.strip() for line in dts.splitlines() if "compatible" in line]


def test_74_shows_boot_memory_and_a_kho_v4_root(mount_khofs):
    m = mount_khofs("--abi", "7.4", "--memory", "1G", cmdline="kho=on kho_bootmem=4M,16M,4M")
    assert out_listing(m) == [("bootmem_len", "-r--------"), ("bootmem_phys", "-r--------"),
                              ("fdt", "-r--------"), ("sub_fdts", "drwxr-xr-x")]
    assert read(os.path.join(m.out, "bootmem_len")) == b"0x400000\n0x1000000\n0x400000\n"
    phys = read(os.path.join(m.out, "bootmem_phys")).split()
    assert len(phys) == 3 and all(p.startswith(b"0x") for p in phys)
    assert compatible(os.path.join(m.out, "fdt")) == ['compatible = "kho-v4";']
    assert status(m.path)["abi"] == "7.4"


def test_the_release_alone_picks_72(mount_khofs):
    m = mount_khofs("--release", "7.2.3", "--memory", "1G")
    st = status(m.path)
    assert (st["abi"], st["release"], st["finalized"]) == ("7.2", "7.2.3", None)
    assert out_listing(m) == [("fdt", "-r--------"), ("scratch_len", "-r--------"),
                              ("scratch_phys", "-r--------"), ("sub_fdts", "drwxr-xr-x")]
    assert compatible(os.path.join(m.out, "fdt")) == ['compatible = "kho-v4";']
    assert khofs("status", m.path).stdout.decode().splitlines()[0] == \
        "release:          7.2.3 (ABI 7.2)"


def test_a_release_without_a_version_is_only_uname(mount_khofs):
    m = mount_khofs("--release", "my-kernel", "--memory", "1G")
    st = status(m.path)
    assert (st["abi"], st["release"]) == ("6.18", "my-kernel")


def test_abi_against_release_is_one_line(mount_khofs, tmp_path):
    d = tmp_path / "never"
    d.mkdir()
    r = khofs("mount", d, "--abi", "7.1", "--release", "7.2.0", check=False)
    assert (r.returncode, r.stdout) == (2, b"")
    assert r.stderr.decode() == "khofs: --abi 7.1 contradicts --release 7.2.0, which is ABI 7.2\n"
    assert not is_mounted(str(d))
    m = mount_khofs("--abi", "7.1", "--memory", "1G")
    r = khofs("kexec", m.path, "--abi", "7.1", "--release", "6.12.0", check=False)
    assert (r.returncode, r.stdout) == (2, b"")
    assert r.stderr.decode() == ("khofs: --abi 7.1 contradicts --release 6.12.0, which is a "
                                 "kernel without KHO (before v6.16)\n")
    assert status(m.path)["kexec_count"] == 0 and not status(m.path)["image_loaded"]
    r = khofs("record", tmp_path / "s.tar", "--from", m.path, "--abi", "7.0", "--release",
              "7.1.5", check=False)
    assert r.returncode == 2 and r.stderr.decode().count("\n") == 1
    assert not (tmp_path / "s.tar").exists()


def test_kexec_by_release_into_71_and_into_a_kernel_without_kho(mount_khofs):
    m = mount_khofs("--abi", "7.2", "--memory", "1G")
    lines = kexec(m.path, "--release", "7.1.5")
    assert lines[0].startswith("KHO: setup: handover FDT (0x")
    assert lines[0].endswith(") is incompatible with 'kho-v3': 1")
    assert lines[1:] == ["KHO: disabling KHO revival"]
    st = status(m.path)
    assert (st["abi"], st["release"]) == ("7.1", "7.1.5")
    assert kexec(m.path, "--release", "6.12.0") == []
    assert os.listdir(m.path) == []
    st = status(m.path)
    assert (st["abi"], st["release"], st["kho_enabled"], st["kexec_count"]) == (
        None, "6.12.0", False, 2)
    assert khofs("status", m.path).stdout.decode().splitlines()[0] == \
        "release:          6.12.0 (no KHO in this release)"
    r = khofs("ctl", m.path, "preserve", "0x100000", "4096", check=False)
    assert (r.returncode, r.stderr.decode()) == (
        1, f"khofs: {m.path}: this kernel (6.12.0) has no KHO: it came in v6.16 [ENODEV]\n")
    kexec(m.path, "--release", "7.4.1")
    assert sorted(os.listdir(m.out)) == ["bootmem_len", "bootmem_phys", "fdt", "sub_fdts"]


@pytest.mark.parametrize("abi", ["7.2", "7.4"])
def test_three_kernel_chain(mount_khofs, tmp_path, abi):
    m = mount_khofs("--abi", abi, "--release", f"{abi}.5", "--memory", "1G",
                    cmdline="kho=on reserve_mem=1M:4096:test_resv")
    data = b"handed over" * 700
    (tmp_path / "p.bin").write_bytes(data)
    phys = int(khofs("ctl", m.path, "mem", "alloc", 2 * PAGE).stdout, 0)
    khofs("ctl", m.path, "mem", "write", hex(phys), tmp_path / "p.bin")
    khofs("ctl", m.path, "preserve", hex(phys), 2 * PAGE)
    assert kexec(m.path, "--release", f"{abi}.6") == [
        "KHO: found kexec handover data.",
        "Revived memory reservation 'test_resv' from KHO",
        f"KHO: exec from: {abi}.5 (count 1)"]
    assert khofs("ctl", m.path, "mem", "read", hex(phys), len(data)).stdout == data
    assert not os.path.exists(os.path.join(m.out, "fdt"))
    md_in = read(os.path.join(m.kho, "in", "sub_fdts", "kexec-metadata"))
    assert md_in == struct.pack("<I", 1) + f"{abi}.5".encode().ljust(65, b"\0") + \
        struct.pack("<I", 1)
    assert f"KHO: exec from: {abi}.6 (count 2)" in kexec(m.path, "--release", f"{abi}.7")
    st = status(m.path)
    assert st["kexec_metadata"] == {"previous_release": f"{abi}.6", "kexec_count": 2}
    assert (st["abi"], st["release"], st["kexec_count"]) == (abi, f"{abi}.7", 2)


def test_a_74_tree_records_and_replays(mount_khofs, tmp_path):
    m = mount_khofs("--abi", "7.4", "--memory", "1G", cmdline="kho=on reserve_mem=1M:4096:r")
    snap = tmp_path / "s.tar"
    khofs("record", snap, "--from", m.path)
    # a copy of the tree (no daemon to ask) is taken for 7.4 by its kho-v4 and bootmem files
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", m.kho, copy], check=True)
    r = khofs("record", tmp_path / "c.tar", "--from", copy)
    assert "ABI 7.4" in r.stdout.decode()
    r = mount_khofs("--replay", snap, cmdline=None, name="succ")
    st = status(r.path)
    assert (st["abi"], st["kho_in"]) == ("7.4", True)
    assert "bootmem_phys" in os.listdir(r.out)
    text = khofs("map", copy).stdout.decode()
    assert "scratch" in text


NEW_PROFILE = textwrap.dedent("""
    import dataclasses, sys
    from khofs.kernel.profile import PROFILES
    PROFILES["9.9"] = dataclasses.replace(
        PROFILES["7.4"], name="9.9", first=(9, 9), compatible="kho-v9",
        scratch_files=("handover_phys", "handover_len"), scratch_param="kho_handover")
    from khofs.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def khofs_with_new_profile(*args):
    return subprocess.run([sys.executable, "-c", NEW_PROFILE, *map(str, args)],
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)


def test_a_profile_only_the_table_knows_mounts_and_kexecs(mount_khofs, tmp_path):
    d = tmp_path / "new"
    d.mkdir()
    path = os.path.realpath(d)
    mount_khofs.paths.append(path)       # unmounted by the fixture whatever happens
    r = khofs_with_new_profile("mount", path, "--release", "9.9.2", "--memory", "1G",
                               "--cmdline", "kho=on kho_handover=2M,8M,2M reserve_mem=1M:4096:r")
    assert r.returncode == 0, r.stderr
    out = os.path.join(path, "kho", "out")
    assert sorted(os.listdir(out)) == ["fdt", "handover_len", "handover_phys", "sub_fdts"]
    assert read(os.path.join(out, "handover_len")) == b"0x200000\n0x800000\n0x200000\n"
    # out/fdt keeps its size from kho_init, before memblock's subtree: no whole FDT for dtc
    assert read(os.path.join(out, "fdt")).count(b"kho-v9\0") == 1
    st = status(path)
    assert (st["abi"], st["release"]) == ("9.9", "9.9.2")
    lines = kexec(path, "--release", "9.9.3")
    assert lines == ["KHO: found kexec handover data.", "Revived memory reservation 'r' from KHO",
                     "KHO: exec from: 9.9.2 (count 1)"]
    assert status(path)["abi"] == "9.9"


COLD_CMDLINE = "kho=on reserve_mem=1M:4096:test_resv khofs.test_kho=1"


@pytest.mark.parametrize("abi,scratch", [("7.2", "scratch"), ("7.4", "bootmem")])
def test_cold_boot_tree_as_a_shell_sees_it(mount_khofs, abi, scratch):
    m = mount_khofs("--abi", abi, "--memory", "1G", cmdline=COLD_CMDLINE)
    ref = mount_khofs("--abi", "7.1", "--memory", "1G", cmdline=COLD_CMDLINE, name="ref")
    r = subprocess.run(["bash", "-c", f"cd {m.kho} && ls -l out out/sub_fdts | "
                        "awk '{print $1, $5, $9}'"], capture_output=True, text=True, check=True)
    files = sorted([("fdt", "233"), (f"{scratch}_len", "25"), (f"{scratch}_phys", "33")])
    assert [line.strip() for line in r.stdout.splitlines()] == [
        "out:", "total"] + [f"-r-------- {size} {name}" for name, size in files] + [
        "drwxr-xr-x 0 sub_fdts", "",
        "out/sub_fdts:", "total",
        "-r-------- 73 kexec-metadata",
        "-r-------- 240 kho_test",
        "-r-------- 214 memblock"]
    # the areas are 7.1's scratch areas under their 7.4 names
    assert read(os.path.join(m.out, f"{scratch}_phys")) == read(os.path.join(ref.out,
                                                                            "scratch_phys"))
    # out/fdt: the first 233 of the 353 bytes the root FDT has now, as in 7.1
    shown = read(os.path.join(m.out, "fdt"))
    assert struct.unpack(">I", shown[4:8])[0] == 353 and shown.count(b"kho-v4\0") == 1
    md = read(os.path.join(m.out, "sub_fdts", "kexec-metadata"))
    assert md == struct.pack("<I", 1) + f"{abi}.0-khofs".encode().ljust(65, b"\0") + \
        struct.pack("<I", 1)
    r = subprocess.run(["bash", "-c", f"echo 1 > {m.out}/finalize"], capture_output=True,
                       text=True)
    assert r.returncode == 1 and "Permission denied" in r.stderr


def test_kexec_load_names_a_kernel_without_kho(mount_khofs):
    m = mount_khofs("--abi", "7.1", "--memory", "1G")
    r = khofs("kexec", "load", m.path, "--release", "6.12.0")
    assert r.stdout.decode() == "loaded 6.12.0 (a kernel without KHO): carries the KHO handover\n"
    r = khofs("kexec", "load", m.path, "--release", "7.4.0")
    assert r.stdout.decode() == "loaded 7.4.0 (ABI 7.4): carries the KHO handover\n"


def test_replay_into_the_kernel_the_release_names(mount_khofs, tmp_path):
    """A 7.1 recording replayed with --release 7.2.3 boots 7.2, which refuses kho-v3."""
    m = mount_khofs("--abi", "7.1", "--memory", "1G", cmdline="kho=on reserve_mem=1M:4096:r")
    snap = tmp_path / "s.tar"
    khofs("record", snap, "--from", m.path)
    r = mount_khofs("--replay", snap, "--release", "7.2.3", cmdline=None, name="succ")
    st = status(r.path)
    assert (st["abi"], st["release"], st["kho_in"]) == ("7.2", "7.2.3", False)
    log = khofs("ctl", r.path, "log").stdout.decode()
    assert "is incompatible with 'kho-v4': 1" in log
