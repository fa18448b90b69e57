"""khofs dump reads what the kernel received, not memory the next kernel reused; a short
7.x out/fdt is completed; --dts takes any blob, a directory and stdin; one libfdt spelling."""

import json
import os
import shutil

import pytest

from khoit import ISSUE_ARGS, khofs, read, run_khofs, write_bytes

CMDLINE = "kho=on reserve_mem=4M:4096:oops"
DRIVER = '/dts-v1/;\n/ {\n\tcompatible = "my-driver-v1";\n};\n'


def khofs_in(data: bytes, *args):
    """khofs ARGS with data on stdin; text out."""
    r = run_khofs(*args, input=data)
    r.stdout, r.stderr = r.stdout.decode(), r.stderr.decode()
    return r


def kexec_with_8k_preserved(m, abi):
    p = khofs("ctl", m, "mem", "alloc", "8192").stdout.strip()
    assert khofs("ctl", m, "preserve", p, "8192").returncode == 0
    if abi in ("6.16", "6.18"):
        assert write_bytes(os.path.join(m.out, "finalize"), b"1") == 1
    assert khofs("kexec", m).returncode == 0
    return json.loads(khofs("status", m, "--json").stdout)["incoming_preserved_bytes"]


@pytest.mark.parametrize("abi,text", [
    ("6.18", "  memory map: as the kernel received it (from the daemon), 2 range(s), "
             "4112 KiB preserved"),
    ("7.1", "  memory map: as the kernel received it (from the daemon), 4 range(s), "
            "4116 KiB preserved")])
def test_in_fdt_map_is_what_the_kernel_received(mount_khofs, tmp_path, abi, text):
    m = mount_khofs("--abi", abi, *ISSUE_ARGS, cmdline=CMDLINE)
    received = kexec_with_8k_preserved(m, abi)
    fdt = os.path.join(m.kho, "in", "fdt")
    r = khofs("dump", fdt)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert text in lines
    assert lines[-1] == "problems: none"
    d = json.loads(khofs("dump", "--json", fdt).stdout)
    assert d["memory_map"]["source"] == "daemon"
    assert d["memory_map"]["total_bytes"] == received
    assert d["memory_map"]["format"] == ("radix-tree" if abi == "7.1" else "chunk-list")
    # A copy has no daemon: the map is not read, and dump says so instead of walking pages.
    copy = tmp_path / "copy"
    shutil.copytree(os.path.join(m.kho, "in"), copy / "in")
    r = khofs("dump", copy / "in" / "fdt")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert not any(ln.strip().startswith("memory map:") for ln in lines)
    assert lines[-2:] == [
        "not read: the preserved-memory map: in/fdt's map points into the old kernel's memory, "
        "which the next kernel reuses; only the mount's daemon tells what it received "
        "(khofs dump on the mount, khofs map)",
        "problems: none in what could be read"]
    assert "memblock-v1" in r.stdout        # everything else still decoded


@pytest.mark.parametrize("abi", ["7.0", "7.1"])
def test_a_short_7x_out_fdt_is_completed(mount_khofs, tmp_path, abi):
    m = mount_khofs("--abi", abi, *ISSUE_ARGS, cmdline=CMDLINE)
    (tmp_path / "d.dts").write_text(DRIVER)
    assert khofs("ctl", m, "subtree", "add", "drv", tmp_path / "d.dts").returncode == 0
    f = os.path.join(m.out, "fdt")
    shown = read(f)
    total = int.from_bytes(shown[4:8], "big")
    assert total > len(shown)
    why = f"note: out/fdt shows {len(shown)} of the FDT's {total} bytes (a {abi} kernel sizes " \
          "it once, when it makes the file); the rest "
    r = khofs("dump", f)
    assert r.returncode == 0, r.stdout
    assert why + "read from the root FDT's page" in r.stdout.splitlines()
    assert "  drv {" in r.stdout.splitlines()
    copy = tmp_path / "copy"
    shutil.copytree(m.kho, copy, copy_function=shutil.copy2)
    r = khofs("dump", copy / "out" / "fdt")
    assert r.returncode == 0, r.stdout
    assert any(ln.startswith(why + "rebuilt the kernel's way") for ln in r.stdout.splitlines())
    assert "  drv {" in r.stdout.splitlines()
    assert r.stdout.splitlines()[-1] == "problems: none in what could be read"


def test_dump_dts_of_any_blob_a_directory_and_stdin(mount_khofs, tmp_path):
    m = mount_khofs("--abi", "7.1", *ISSUE_ARGS, cmdline=CMDLINE)
    (tmp_path / "raw").write_bytes(b"raw bytes!")
    assert khofs("ctl", m, "subtree", "add", "rawblob", tmp_path / "raw").returncode == 0
    assert khofs("kexec", m).returncode == 0
    ind = os.path.join(m.kho, "in")
    raw = os.path.join(ind, "sub_fdts", "rawblob")
    r = khofs("dump", "--dts", raw)
    assert (r.returncode, r.stdout) == (0, f"// {raw}: 10 bytes, not an FDT\n")
    r = khofs("dump", "--dts", ind)
    assert r.returncode == 0, r.stderr
    heads = [ln for ln in r.stdout.splitlines() if ln.startswith("// /")]
    assert heads == [f"// {ind}/fdt", f"// {ind}/sub_fdts/kexec-metadata: 73 bytes, not an FDT",
                     f"// {ind}/sub_fdts/memblock", f"// {ind}/sub_fdts/rawblob: 10 bytes, not an FDT"]
    memblock = read(os.path.join(ind, "sub_fdts", "memblock"))
    r = khofs_in(memblock, "dump", "--dts", "-")
    assert r.returncode == 0 and 'compatible = "memblock-v1";' in r.stdout
    assert r.stdout == khofs("dump", "--dts", os.path.join(ind, "sub_fdts", "memblock")).stdout
    r = khofs_in(read(os.path.join(ind, "fdt")), "dump", "-")
    assert r.returncode == 0 and r.stdout.startswith("stdin: FDT kho-v3, ")


def test_one_spelling_of_libfdt_errors(mount_khofs, tmp_path):
    m = mount_khofs()
    cut = tmp_path / "cut.dtb"
    cut.write_bytes(b"\xd0\x0d\xfe\xed" + bytes(4) + b"garbage")
    r = khofs("ctl", m, "subtree", "add", "x", cut)
    assert r.stderr == f"khofs: {m}: subtree 'x': not a valid FDT blob, FDT_ERR_TRUNCATED " \
                       "(15 bytes) [EINVAL]\n"
    bad = tmp_path / "bad.dtb"
    bad.write_bytes(b"\x7fELF" + bytes(60))
    r = khofs("dump", bad)
    assert r.returncode == 1
    assert "  - not a valid FDT (FDT_ERR_BADMAGIC)" in r.stdout.splitlines()
    r = khofs("diff", bad, bad)
    assert r.stderr == f"khofs: {bad}: not an FDT (FDT_ERR_BADMAGIC)\n"
    r = khofs_in(b"\xd0\x0d\xfe\xed" + bytes(4), "dump", "-")
    assert "not a valid FDT (FDT_ERR_TRUNCATED)" in r.stdout
