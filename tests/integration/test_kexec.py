"""Integration tests: kexec with KHO through a real FUSE mount, the CLI and the control socket."""

import json
import os
import signal
import socket
import stat
import subprocess
import time

import libfdt
import pytest

from khofs import runtime
from khoit import KHOFS, assert_removed, is_mounted, pid_alive, read, wait_until
from khoit import khofs_bytes as khofs

pytestmark = pytest.mark.fuse

PAGE = 4096

MY_DTS = """/dts-v1/;
/ {
    compatible = "my-producer-v1";
    cells = <0x1 0x2 0x3>;
    label = "handed over";
};
"""


# -- helpers ------------------------------------------------------------------------
def sh(cmd, timeout=30):
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=timeout)


def status(mnt):
    return json.loads(khofs("status", mnt, "--json").stdout)


def log_lines(mnt):
    return khofs("ctl", mnt, "log").stdout.decode()


def finalize(mnt, value="1"):
    r = sh(f"echo {value} > {mnt}/kho/out/finalize")
    assert r.returncode == 0, r.stderr
    assert read(f"{mnt}/kho/out/finalize") == (b"1\n" if value != "0" else b"0\n")


def alloc_payload(mnt, tmp_path, size=8192):
    data = os.urandom(size)
    f = tmp_path / f"payload-{os.urandom(4).hex()}.bin"
    f.write_bytes(data)
    phys = int(khofs("ctl", mnt, "mem", "alloc", size).stdout, 0)
    khofs("ctl", mnt, "mem", "write", hex(phys), f)
    return phys, data


def mem_read(mnt, phys, size):
    return khofs("ctl", mnt, "mem", "read", hex(phys), size).stdout


def dtb_of(dts_path):
    return subprocess.run(["dtc", "-q", "-I", "dts", "-O", "dtb", "-o", "-", str(dts_path)],
                          capture_output=True, check=True).stdout


def same_tree(blob, dts_path) -> bool:
    """The blob holds the tree dtc compiles from dts_path (khofs lays it out with libfdt's
    sequential-write API, as a kernel producer does, so the bytes are not dtc's)."""
    def text(b):
        return subprocess.run(["dtc", "-q", "-I", "dtb", "-O", "dts", "-"], input=b,
                              capture_output=True, check=True).stdout
    return text(blob) == text(dtb_of(dts_path))


def assert_lost(back, old):
    """Unpreserved memory does not survive: each page reads as zeros, unless the next kernel
    reused it for one of its own FDT pages (allocations are top-down into free memory)."""
    assert len(back) == len(old)
    for i in range(0, len(old), PAGE):
        page = back[i:i + PAGE]
        assert page != old[i:i + PAGE], f"page +{i:#x} survived the kexec"
        assert page == bytes(PAGE) or page[:4] == b"\xd0\x0d\xfe\xed", f"page +{i:#x}: {page[:32]!r}"


def assert_fresh_out(mnt):
    assert read(f"{mnt}/kho/out/finalize") == b"0\n"
    assert not os.path.exists(f"{mnt}/kho/out/fdt")
    assert os.listdir(f"{mnt}/kho/out/sub_fdts") == []


# -- round trip --------------------------------------------------------------------------
def test_round_trip(path_mounts, tmp_path):
    mnt = path_mounts("--cmdline", "kho=on reserve_mem=4M:4096:oops kho_scratch=16M,64M,16M",
                      "--memory", "2G")
    dts = tmp_path / "my.dts"
    dts.write_text(MY_DTS)
    phys, payload = alloc_payload(mnt, tmp_path)
    loose, loose_data = alloc_payload(mnt, tmp_path)
    assert mem_read(mnt, loose, 8192) != bytes(8192)
    khofs("ctl", mnt, "subtree", "add", "myprod", dts)
    khofs("ctl", mnt, "preserve", hex(phys), 8192)
    finalize(mnt)

    memblock = read(f"{mnt}/kho/out/sub_fdts/memblock")
    fdt = libfdt.Fdt(memblock)
    node = fdt.path_offset("/oops")
    start = int.from_bytes(bytes(fdt.getprop(node, "start")), "little")
    size = int.from_bytes(bytes(fdt.getprop(node, "size")), "little")
    assert size == 4 << 20
    # dtc agrees with pylibfdt on where the region is (LE u64 shown as two cells).
    dts_text = subprocess.run(["dtc", "-I", "dtb", "-O", "dts", f"{mnt}/kho/out/sub_fdts/memblock"],
                              capture_output=True, text=True, check=True).stdout
    le = start.to_bytes(8, "little")
    cells = [int.from_bytes(le[i:i + 4], "big") for i in (0, 4)]
    assert f"start = <{cells[0]:#04x} {cells[1]:#04x}>;" in dts_text, dts_text
    # A ramoops-like user keeps writing into its region while finalized.
    region_head, region_tail = os.urandom(PAGE), os.urandom(PAGE)
    (tmp_path / "head").write_bytes(region_head)
    (tmp_path / "tail").write_bytes(region_tail)
    khofs("ctl", mnt, "mem", "write", hex(start), tmp_path / "head")
    khofs("ctl", mnt, "mem", "write", hex(start + size - PAGE), tmp_path / "tail")

    out_fdt = read(f"{mnt}/kho/out/fdt")
    scratch_phys = read(f"{mnt}/kho/out/scratch_phys")
    scratch_len = read(f"{mnt}/kho/out/scratch_len")
    assert scratch_len == b"0x1000000\n0x4000000\n0x1000000\n"

    r = khofs("kexec", mnt, "--release", "6.18.2-next",
              "--cmdline", "kho=on reserve_mem=4M:4096:oops kho_scratch=32M,128M,32M")
    assert "Revived memory reservation 'oops' from KHO" in r.stdout.decode()

    # in/ mirrors the previous out/ byte for byte.
    assert read(f"{mnt}/kho/in/fdt") == out_fdt
    assert read(f"{mnt}/kho/in/sub_fdts/memblock") == memblock
    assert same_tree(read(f"{mnt}/kho/in/sub_fdts/myprod"), dts)
    assert sorted(os.listdir(f"{mnt}/kho/in/sub_fdts")) == ["memblock", "myprod"]
    for p in ("in", "in/sub_fdts"):
        st = os.stat(f"{mnt}/kho/{p}")
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755, p
    for p in ("in/fdt", "in/sub_fdts/memblock", "in/sub_fdts/myprod"):
        st = os.stat(f"{mnt}/kho/{p}")
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o400, p

    assert_fresh_out(mnt)
    # kho_scratch= of the next command line is ignored after a KHO kexec.
    assert read(f"{mnt}/kho/out/scratch_phys") == scratch_phys
    assert read(f"{mnt}/kho/out/scratch_len") == scratch_len

    assert mem_read(mnt, phys, 8192) == payload
    assert_lost(mem_read(mnt, loose, 8192), loose_data)
    assert mem_read(mnt, start, PAGE) == region_head
    assert mem_read(mnt, start + size - PAGE, PAGE) == region_tail

    st = status(mnt)
    assert (st["kexec_count"], st["release"], st["kho_in"]) == (1, "6.18.2-next", True)
    assert "Revived memory reservation 'oops' from KHO" in log_lines(mnt)
    daemon_log = runtime.paths(mnt)["log"]
    wait_until(lambda: "Revived memory reservation 'oops' from KHO" in
               open(daemon_log, errors="replace").read(), timeout=10,
               what="revival line in the daemon log")


def test_chain_of_three_kexecs(path_mounts, tmp_path):
    mnt = path_mounts("--cmdline", "kho=on", "--memory", "2G")
    phys, payload = alloc_payload(mnt, tmp_path, 3 * PAGE)
    scratch = (read(f"{mnt}/kho/out/scratch_phys"), read(f"{mnt}/kho/out/scratch_len"))
    prev = status(mnt)["release"]
    for n, release in enumerate(["6.19.0-a", "6.19.0-b", "6.19.0-c"], start=1):
        # Preservations belong to one boot: the range is preserved again every time.
        khofs("ctl", mnt, "preserve", hex(phys), 3 * PAGE)
        finalize(mnt)
        khofs("kexec", mnt, "--release", release)
        st = status(mnt)
        assert st["kexec_count"] == n
        assert st["release"] == release
        assert st["previous_release"] == prev
        assert st["kho_in"] is True and st["finalized"] is False
        assert (read(f"{mnt}/kho/out/scratch_phys"), read(f"{mnt}/kho/out/scratch_len")) == scratch
        assert mem_read(mnt, phys, 3 * PAGE) == payload, f"payload lost after kexec {n}"
        assert_fresh_out(mnt)
        prev = release


def test_chain_preservation_does_not_carry_over(path_mounts, tmp_path):
    # Counterpart of the chain: survived once, not preserved again -> gone after the next kexec.
    mnt = path_mounts("--cmdline", "kho=on", "--memory", "1G")
    phys, payload = alloc_payload(mnt, tmp_path)
    khofs("ctl", mnt, "preserve", hex(phys), 8192)
    finalize(mnt)
    khofs("kexec", mnt)
    assert mem_read(mnt, phys, 8192) == payload
    finalize(mnt)
    khofs("kexec", mnt)
    assert status(mnt)["kexec_count"] == 2
    assert_lost(mem_read(mnt, phys, 8192), payload)


# -- 6.18 load ordering -------------------------------------------------------------------
def test_load_before_finalize_carries_no_handover(path_mounts, tmp_path):
    mnt = path_mounts("--cmdline", "kho=on", "--memory", "1G")
    phys, payload = alloc_payload(mnt, tmp_path)
    khofs("ctl", mnt, "preserve", hex(phys), 8192)
    r = khofs("kexec", "load", mnt, "--release", "6.18.1-next")
    assert "carries no KHO handover" in r.stdout.decode()
    finalize(mnt)
    r = khofs("kexec", "exec", mnt)
    err = r.stderr.decode()
    assert "loaded before" in err and "finalized" in err, err
    assert not os.path.exists(f"{mnt}/kho/in")
    assert os.listdir(f"{mnt}/kho") == ["out"]
    st = status(mnt)
    assert st["kho_in"] is False
    assert (st["kexec_count"], st["release"]) == (1, "6.18.1-next")
    assert_lost(mem_read(mnt, phys, 8192), payload)
    assert_fresh_out(mnt)


def test_load_after_finalize_carries_handover(path_mounts, tmp_path):
    mnt = path_mounts("--cmdline", "kho=on", "--memory", "1G")
    phys, payload = alloc_payload(mnt, tmp_path)
    khofs("ctl", mnt, "preserve", hex(phys), 8192)
    finalize(mnt)
    out_fdt = read(f"{mnt}/kho/out/fdt")
    r = khofs("kexec", "load", mnt)
    assert "carries the KHO handover" in r.stdout.decode()
    r = khofs("kexec", "exec", mnt)
    assert "loaded before" not in r.stderr.decode()
    assert os.path.isdir(f"{mnt}/kho/in")
    assert read(f"{mnt}/kho/in/fdt") == out_fdt
    assert status(mnt)["kho_in"] is True
    assert mem_read(mnt, phys, 8192) == payload


def test_kexec_without_finalize_618(path_mounts, tmp_path):
    mnt = path_mounts("--cmdline", "kho=on", "--memory", "1G")
    phys, payload = alloc_payload(mnt, tmp_path)
    khofs("ctl", mnt, "preserve", hex(phys), 8192)
    khofs("kexec", mnt)
    assert not os.path.exists(f"{mnt}/kho/in")
    st = status(mnt)
    assert st["kho_in"] is False and st["kexec_count"] == 1
    assert st["incoming_preserved_bytes"] == 0
    assert_lost(mem_read(mnt, phys, 8192), payload)
    assert "found kexec handover data" not in log_lines(mnt)


def test_616_kexec_without_finalize_is_rejected(path_mounts, tmp_path):
    mnt = path_mounts("--cmdline", "kho=on", "--memory", "1G", "--abi", "6.16")
    phys, _ = alloc_payload(mnt, tmp_path)
    khofs("ctl", mnt, "preserve", hex(phys), 8192)
    khofs("kexec", mnt)
    log = log_lines(mnt)
    assert "is invalid" in log and "disabling KHO revival" in log, log
    assert "found kexec handover data" not in log
    assert not os.path.exists(f"{mnt}/kho/in")
    st = status(mnt)
    assert st["kho_in"] is False and st["abi"] == "6.16" and st["kexec_count"] == 1
    assert_fresh_out(mnt)


# -- sub-FDT misuse -------------------------------------------------------------------------
def test_unpreserved_subtree_arrives_zeroed(path_mounts, tmp_path):
    mnt = path_mounts("--cmdline", "kho=on", "--memory", "1G")
    dts = tmp_path / "my.dts"
    dts.write_text(MY_DTS)
    khofs("ctl", mnt, "subtree", "add", "bad", dts, "--no-preserve")
    khofs("ctl", mnt, "subtree", "add", "good", dts)
    finalize(mnt)
    assert same_tree(read(f"{mnt}/kho/out/sub_fdts/bad"), dts)
    r = khofs("kexec", mnt)
    notes = [line for line in r.stderr.decode().splitlines() if "not in preserved memory" in line]
    assert len(notes) == 1, r.stderr.decode()
    assert "'bad'" in notes[0]
    assert sorted(os.listdir(f"{mnt}/kho/in/sub_fdts")) == ["bad", "good"]
    assert read(f"{mnt}/kho/in/sub_fdts/bad") == b""
    assert same_tree(read(f"{mnt}/kho/in/sub_fdts/good"), dts)
    assert any("'bad'" in n and "not in preserved memory" in n for n in status(mnt)["kexec_notes"])


# -- the KHO test module ------------------------------------------------------------------------
def test_test_kho_restore_succeeds(path_mounts):
    mnt = path_mounts("--cmdline", "kho=on khofs.test_kho=1", "--memory", "1G")
    assert os.listdir(f"{mnt}/kho/out/sub_fdts") == []
    finalize(mnt)
    assert "kho_test" in os.listdir(f"{mnt}/kho/out/sub_fdts")
    khofs("kexec", mnt)
    log = log_lines(mnt)
    assert "test_kho: KHO restore succeeded" in log, log
    assert "KHO restore failed" not in log
    assert "kho_test" in os.listdir(f"{mnt}/kho/in/sub_fdts")
    # Spec §10: after a restore no fresh kho_test is registered; the kernel after that does.
    finalize(mnt)
    assert os.listdir(f"{mnt}/kho/out/sub_fdts") == []
    khofs("kexec", mnt)
    assert not os.path.exists(f"{mnt}/kho/in/sub_fdts/kho_test")
    assert "test_kho:" not in log_lines(mnt)
    finalize(mnt)
    assert os.listdir(f"{mnt}/kho/out/sub_fdts") == ["kho_test"]


def test_test_kho_abort_quirk(path_mounts):
    # Spec §10: abort drops the folios test_kho preserved at boot; the next kernel can't restore.
    mnt = path_mounts("--cmdline", "kho=on khofs.test_kho=1", "--memory", "1G")
    finalize(mnt)
    finalize(mnt, "0")
    finalize(mnt)
    khofs("kexec", mnt)
    log = log_lines(mnt)
    assert "test_kho: KHO restore failed" in log, log
    assert "KHO restore succeeded" not in log


@pytest.mark.parametrize("abi", ["6.18", "6.16"])
def test_test_kho_detects_corrupted_folio(path_mounts, tmp_path, abi):
    mnt = path_mounts("--cmdline", "kho=on khofs.test_kho=1", "--memory", "1G", "--abi", abi)
    finalize(mnt)
    fdt = libfdt.Fdt(read(f"{mnt}/kho/out/sub_fdts/kho_test"))
    data = fdt.path_offset("/data")
    info = bytes(fdt.getprop(data, "folios_info"))
    nr = int.from_bytes(bytes(fdt.getprop(data, "nr_folios")), "little")
    if abi == "6.18":
        # struct kho_vmalloc {u64 first chunk; u32 total_pages; u16 flags; u16 order}: the
        # phys|order list lives in the vmalloc pages the chunk lists.
        assert len(info) == 16
        chunk = int.from_bytes(info[:8], "little")
        page = int.from_bytes(mem_read(mnt, chunk + 8, 8), "little")
        info = mem_read(mnt, page, 8 * nr)
    assert len(info) == 8 * nr > 0
    folio = int.from_bytes(info[:8], "little") & ~(PAGE - 1)
    old = mem_read(mnt, folio, 2)
    (tmp_path / "flip").write_bytes(bytes([old[0] ^ 0xFF, old[1] ^ 0x0F]))
    khofs("ctl", mnt, "mem", "write", hex(folio), tmp_path / "flip")
    khofs("kexec", mnt)
    log = log_lines(mnt)
    assert "test_kho: KHO restore failed" in log, log
    assert "KHO restore succeeded" not in log


# -- fault injection ------------------------------------------------------------------------------
def test_injected_finalize_failure(path_mounts, tmp_path):
    mnt = path_mounts("--cmdline", "kho=on reserve_mem=1M:4096:oops", "--memory", "1G")
    dts = tmp_path / "my.dts"
    dts.write_text(MY_DTS)
    khofs("ctl", mnt, "subtree", "add", "myprod", dts)
    khofs("ctl", mnt, "fail", "finalize", "ENOMEM")
    r = sh(f"echo 1 > {mnt}/kho/out/finalize")
    assert r.returncode != 0
    assert "Cannot allocate memory" in r.stderr
    assert_fresh_out(mnt)
    assert status(mnt)["finalized"] is False
    assert "Failed to convert KHO state tree: -12" in log_lines(mnt)
    # One-shot: the next finalize works and shows everything.
    finalize(mnt)
    assert os.path.exists(f"{mnt}/kho/out/fdt")
    assert sorted(os.listdir(f"{mnt}/kho/out/sub_fdts")) == ["memblock", "myprod"]


def test_a_descriptor_opened_before_the_kexec_is_of_a_removed_file(path_mounts):
    mnt = path_mounts("--cmdline", "kho=on reserve_mem=1M:4096:oops", "--memory", "1G")
    finalize(mnt)
    fds = [os.open(f"{mnt}/kho/out/{name}", os.O_RDONLY)
           for name in ("fdt", "scratch_len", "finalize", "sub_fdts/memblock")]
    try:
        khofs("kexec", mnt)
        for fd in fds:
            assert_removed(fd)
        assert read(f"{mnt}/kho/out/finalize") == b"0\n"
    finally:
        for fd in fds:
            os.close(fd)


# -- state dir ---------------------------------------------------------------------------------------
def test_state_dir_remount_boots_from_handover(path_mounts, tmp_path):
    state = tmp_path / "state"
    cmdline = "kho=on reserve_mem=1M:4096:oops"
    mnt = path_mounts("--cmdline", cmdline, "--memory", "1G", "--state", state)
    st = os.stat(state)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    phys, payload = alloc_payload(mnt, tmp_path)
    khofs("ctl", mnt, "preserve", hex(phys), 8192)
    finalize(mnt)
    khofs("kexec", mnt, "--release", "6.18.0-second")
    in_fdt = read(f"{mnt}/kho/in/fdt")
    in_memblock = read(f"{mnt}/kho/in/sub_fdts/memblock")
    khofs("umount", mnt)
    assert not is_mounted(mnt)

    path_mounts("--state", state)
    st = status(mnt)
    assert st["kexec_count"] == 1 and st["kho_in"] is True
    assert st["release"] == "6.18.0-second" and st["cmdline"] == cmdline
    assert read(f"{mnt}/kho/in/fdt") == in_fdt
    assert read(f"{mnt}/kho/in/sub_fdts/memblock") == in_memblock
    assert mem_read(mnt, phys, 8192) == payload
    assert "Revived memory reservation 'oops' from KHO" in log_lines(mnt)
    assert_fresh_out(mnt)


def _kexec_request_raw(mnt):
    """Send a kexec request straight to the socket (no client start-up delay)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(runtime.paths(mnt)["sock"])
    sock.sendall(b'{"cmd": "kexec", "release": "new"}\n')
    return sock


# How the kill is timed: the literal "start `khofs kexec` in the background, kill a few ms
# later"; the moment a handover.tmp* file shows up (mid-write); and fixed delays after the
# request reached the daemon (before, during and after the state write).
@pytest.mark.parametrize("how", ["cli+5ms", "cli+tmpfile", "sock+20ms", "sock+50ms"])
def test_kill_daemon_during_kexec(path_mounts, tmp_path, how):
    state = tmp_path / "state"
    mnt = path_mounts("--cmdline", "kho=on", "--memory", "1G", "--state", state)
    # A few MiB of preserved data make the handover write long enough to be hit.
    size = 8 << 20
    phys, payload = alloc_payload(mnt, tmp_path, size)
    khofs("ctl", mnt, "preserve", hex(phys), size)
    finalize(mnt)
    khofs("kexec", mnt, "--release", "old")
    old_fdt = read(f"{mnt}/kho/in/fdt")
    khofs("ctl", mnt, "preserve", hex(phys), size)
    finalize(mnt)

    info = runtime.read_info(mnt)
    assert info["mountpoint"] == mnt
    pid = info["pid"]
    assert pid_alive(pid)
    proc = sock = None
    if how.startswith("cli"):
        proc = subprocess.Popen(KHOFS + ["kexec", mnt, "--release", "new"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if how == "cli+5ms":
            time.sleep(0.005)
        else:
            deadline = time.monotonic() + 10
            while (time.monotonic() < deadline and proc.poll() is None and
                   not any(".tmp" in n for n in os.listdir(state))):
                pass
    else:
        sock = _kexec_request_raw(mnt)
        time.sleep(int(how.split("+")[1][:-2]) / 1000)
    os.kill(pid, signal.SIGKILL)
    if proc:
        proc.wait(timeout=30)
    if sock:
        sock.close()
    wait_until(lambda: not pid_alive(pid), timeout=10, what="the killed daemon to go away")

    r = khofs("umount", mnt, check=False)
    assert r.returncode == 0, r.stderr.decode()
    assert not is_mounted(mnt)

    path_mounts("--state", state)
    leftovers = [n for n in os.listdir(state) if ".tmp" in n]
    assert leftovers == []
    st = status(mnt)
    assert (st["kexec_count"], st["release"]) in ((1, "old"), (2, "new")), st
    assert st["kho_in"] is True
    if st["kexec_count"] == 1:
        assert read(f"{mnt}/kho/in/fdt") == old_fdt
    assert mem_read(mnt, phys, size) == payload
