"""khofs record and khofs mount --replay through real mounts: khofs's own trees under every ABI
profile, copies of a kho/ tree edited by hand, the running system's tree (a kho/ bind-mounted
on /sys/kernel/debug in a private mount namespace), bad snapshots, and the mount(8) form."""

import io
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile

import pytest

from khoit import khofs, read, write_bytes
from khofs.kernel.profile import PROFILES

CMDLINE = "kho=on reserve_mem=4M:4096:oops khofs.test_kho=1"
REVIVED = "Revived memory reservation 'oops' from KHO"
PAGE = 4096


def listing(kho):
    """(path, mode string) of kho/ and everything below it."""
    out = [("kho", stat.filemode(os.stat(kho).st_mode))]
    for root, dirs, files in os.walk(kho):
        for name in dirs + files:
            p = os.path.join(root, name)
            out.append(("kho/" + os.path.relpath(p, kho), stat.filemode(os.lstat(p).st_mode)))
    return sorted(out)


def tar_listing(snap):
    with tarfile.open(snap) as tar:
        return sorted((m.name, stat.filemode(m.mode | (stat.S_IFDIR if m.isdir() else
                                                       stat.S_IFREG)))
                      for m in tar.getmembers() if m.name.split("/")[0] == "kho")


def manifest(snap):
    with tarfile.open(snap) as tar:
        return json.load(tar.extractfile("manifest.json"))


def status(mnt):
    return json.loads(khofs("status", mnt, "--json").stdout)


def kernel_log(mnt):
    return khofs("ctl", mnt, "log").stdout.splitlines()


def one_line_error(r, text):
    assert r.returncode == 1, r
    assert r.stderr == f"khofs: {text}\n"


def finalize(mnt):
    if os.path.exists(os.path.join(mnt, "kho/out/finalize")):
        assert write_bytes(os.path.join(mnt, "kho/out/finalize"), b"1") == 1


@pytest.mark.parametrize("abi", list(PROFILES))
def test_round_trip_through_mounts(mount_khofs, tmp_path, abi):
    old = mount_khofs("--memory", "1G", "--abi", abi, cmdline=CMDLINE)
    phys = int(khofs("ctl", old, "mem", "alloc", 2 * PAGE).stdout, 0)
    (tmp_path / "p").write_bytes(b"kept in preserved memory")
    khofs("ctl", old, "mem", "write", hex(phys), tmp_path / "p")
    khofs("ctl", old, "preserve", hex(phys), 2 * PAGE)
    finalize(old)
    snap = tmp_path / "old.khosnap"
    r = khofs("record", snap, "--from", old)
    assert r.returncode == 0 and r.stderr == ""
    subs = sorted(os.listdir(os.path.join(old.out, "sub_fdts")))
    assert r.stdout == (f"recorded {_files(old.kho)} files of {old.kho} (release {abi}.0-khofs, "
                        f"ABI {abi}, {len(subs)} sub-blob(s)) in {snap}\n")
    assert tar_listing(snap) == listing(old.kho)
    man = manifest(snap)
    assert man["source"] == {"kind": "khofs", "path": old.kho}
    assert (man["release"], man["cmdline"], man["abi"]) == (f"{abi}.0-khofs", CMDLINE, abi)
    assert (man["memory"], man["nodes"]) == (1 << 30, 1)
    with tarfile.open(snap) as tar:
        for path in [p for p, _ in listing(old.kho) if os.path.isfile(os.path.join(old.path, p))]:
            assert tar.extractfile(path).read() == read(os.path.join(old.path, path)), path
        whole = tar.extractfile("extra/root-fdt").read() if abi.startswith("7") else None

    new = mount_khofs("--replay", snap, cmdline=None, name="new")
    assert new.result.stderr.splitlines()[0] == (
        f"khofs: replay: the successor of {abi}.0-khofs (ABI {abi}) recorded in {snap}")
    assert "khofs: replay: not in the recording: the contents of preserved memory: they read " \
        "as zeros here" in new.result.stderr
    in_fdt = read(os.path.join(new.kho, "in/fdt"))
    out_fdt = read(os.path.join(old.out, "fdt"))
    if whole is None:
        assert in_fdt == out_fdt
    else:       # 7.x: out/fdt shows the FDT's size when the file was made; in/ shows it whole
        assert in_fdt == whole and in_fdt.startswith(out_fdt) and len(in_fdt) > len(out_fdt)
    assert sorted(os.listdir(os.path.join(new.kho, "in/sub_fdts"))) == subs
    for name in subs:
        assert read(os.path.join(new.kho, "in/sub_fdts", name)) == \
            read(os.path.join(old.out, "sub_fdts", name))
    log = kernel_log(new)
    assert REVIVED in log and "test_kho: KHO restore failed" in log
    assert ("KHO: exec from: 7.1.0-khofs (count 1)" in log) == (abi == "7.1")
    st_old, st_new = status(old), status(new)
    assert st_new["scratch"] == st_old["scratch"]
    assert (st_new["abi"], st_new["release"], st_new["previous_release"]) == \
        (abi, f"{abi}.0-khofs", f"{abi}.0-khofs")
    assert st_new["kexec_count"] == 1 and st_new["kho_in"] is True
    assert st_new["replay"]["snapshot"] == str(snap)
    assert st_new["replay"]["recorded_abi"] == abi
    text = khofs("status", new).stdout
    assert f"replay:           the successor of {abi}.0-khofs (ABI {abi}) recorded in {snap}" \
        in text
    assert "replay:           not in the recording: the memory map's " in text
    # The payload's bytes were preserved memory: the recording does not hold them.
    assert khofs("ctl", new, "mem", "read", hex(phys), 24).stdout == "\0" * 24

    # The replayed kernel goes on as any successor: it hands over again.
    finalize(new)
    r = khofs("kexec", new)
    assert r.returncode == 0 and REVIVED in r.stdout
    assert status(new)["replay"] is None and status(new)["kexec_count"] == 2


def _files(kho):
    return sum(len(files) for _, _, files in os.walk(kho))


def test_record_refuses_what_hands_nothing_over(mount_khofs, tmp_path):
    m = mount_khofs("--memory", "1G", cmdline="kho=on reserve_mem=4M:4096:oops")
    snap = tmp_path / "s"
    r = khofs("record", snap, "--from", m)
    one_line_error(r, f"{m.kho}/out/fdt is missing: KHO hands nothing over until it is "
                   "finalized; run echo 1 > kho/out/finalize, then record again")
    r = khofs("record", snap, "--from", tmp_path / "nowhere")
    one_line_error(r, f"{tmp_path / 'nowhere'}: no kho/ debugfs tree here (no out/ directory)")
    finalize(m)
    r = khofs("record", tmp_path / "no-such-dir" / "s", "--from", m)
    one_line_error(r, f"cannot write {tmp_path / 'no-such-dir' / 's'}: No such file or directory")
    # Nothing written (the mount itself may live in tmp_path or be the worker's reused one).
    assert [p for p in os.listdir(tmp_path) if str(tmp_path / p) != m.path] == []


def test_record_a_7x_tree_after_a_kexec(mount_khofs, tmp_path):
    """After a 7.x kexec debugfs shows no out/fdt: a khofs mount's daemon still has the root
    FDT and record keeps it; a copy of the same tree cannot be recorded."""
    m = mount_khofs("--memory", "1G", "--abi", "7.1", cmdline="kho=on reserve_mem=4M:4096:oops")
    assert khofs("kexec", m).returncode == 0
    assert not os.path.exists(os.path.join(m.out, "fdt"))
    snap = tmp_path / "s"
    assert khofs("record", snap, "--from", m).returncode == 0
    new = mount_khofs("--replay", snap, cmdline=None, name="new")
    log = kernel_log(new)
    assert "KHO: exec from: 7.1.0-khofs (count 2)" in log and REVIVED in log
    assert status(new)["kexec_count"] == 2
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", m.kho, copy], check=True)
    r = khofs("record", tmp_path / "s2", "--from", copy)
    one_line_error(r, f"{copy}/out/fdt is missing: a 7.x kernel shows it only after a cold "
                   "boot, so this kernel's handover cannot be recorded from debugfs")


@pytest.fixture
def copied(mount_khofs, tmp_path):
    """A finalized 6.18 mount's kho/ copied with cp -a, as one would copy a real kernel's."""
    m = mount_khofs("--memory", "1G", cmdline="kho=on reserve_mem=4M:4096:oops")
    finalize(m)
    copy = tmp_path / "copy"
    assert subprocess.run(["cp", "-a", m.kho, copy]).returncode == 0
    assert listing(copy) == listing(m.kho)
    return m, copy


def test_a_copied_tree_records_and_replays(mount_khofs, tmp_path, copied):
    m, copy = copied
    snap = tmp_path / "copy.khosnap"
    r = khofs("record", snap, "--from", copy)
    assert r.returncode == 0
    assert r.stdout == f"recorded 5 files of {copy} (ABI 6.18, 1 sub-blob(s)) in {snap}\n"
    man = manifest(snap)
    assert man["source"] == {"kind": "directory", "path": str(copy)}
    assert "release" not in man and "cmdline" not in man
    # Without a recorded command line, the next kernel's is given as a real kexec would.
    new = mount_khofs("--replay", snap, cmdline="kho=on reserve_mem=4M:4096:oops", name="new")
    assert read(os.path.join(new.kho, "in/fdt")) == read(os.path.join(m.out, "fdt"))
    assert read(os.path.join(new.kho, "in/sub_fdts/memblock")) == \
        read(os.path.join(m.out, "sub_fdts/memblock"))
    assert REVIVED in kernel_log(new)
    assert "the successor of an unknown release (ABI 6.18)" in new.result.stderr
    assert status(new)["previous_release"] is None
    assert "previous release: -" in khofs("status", new).stdout


def test_a_copy_names_its_kernel(mount_khofs, tmp_path):
    """A copy does not say which release made it: record --abi/--release/--cmdline do."""
    m = mount_khofs("--memory", "1G", "--abi", "6.16", cmdline="kho=on reserve_mem=4M:4096:oops")
    finalize(m)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", m.kho, copy], check=True)
    snap = tmp_path / "s"
    r = khofs("record", snap, "--from", copy, "--abi", "6.16", "--release", "6.17.2",
              "--cmdline", "kho=on reserve_mem=4M:4096:oops")
    assert r.stdout == f"recorded 5 files of {copy} (release 6.17.2, ABI 6.16, 1 sub-blob(s)) " \
        f"in {snap}\n"
    man = manifest(snap)
    assert (man["abi"], man["release"], man["cmdline"]) == \
        ("6.16", "6.17.2", "kho=on reserve_mem=4M:4096:oops")
    new = mount_khofs("--replay", snap, cmdline=None, name="new")
    assert status(new)["abi"] == "6.16" and REVIVED in kernel_log(new)
    assert os.listdir(os.path.join(new.kho, "in/sub_fdts")) == ["memblock"]
    r = khofs("record", snap, "--from", copy, "--abi", "6.99")
    assert r.returncode == 2 and "invalid choice: '6.99'" in r.stderr


@pytest.mark.parametrize("abi", ["7.0", "7.1"])
def test_a_copied_7x_tree_is_rebuilt(mount_khofs, tmp_path, abi):
    """A 7.x kernel's out/fdt is cut at the size it had when made; a copy holds no more. The
    rest of the root FDT is rebuilt the kernel's way and the successor revives from it."""
    m = mount_khofs("--memory", "1G", "--abi", abi, cmdline=CMDLINE)
    finalize(m)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", m.kho, copy], check=True)
    shown = (copy / "out/fdt").read_bytes()
    snap = tmp_path / "s"
    r = khofs("record", snap, "--from", copy)
    assert r.returncode == 0, r.stderr
    assert f"(ABI {abi}, 2 sub-blob(s))" in r.stdout or f"(ABI {abi}, 3 sub-blob(s))" in r.stdout
    new = mount_khofs("--replay", snap, cmdline=CMDLINE, name="new")
    assert f"khofs: replay: not in the recording: the root FDT past the {len(shown)} bytes " \
        "out/fdt showed" in new.result.stderr
    assert "khofs: replay: not in the recording: where out/sub_fdts/" in new.result.stderr
    in_fdt = read(os.path.join(new.kho, "in/fdt"))
    assert in_fdt.startswith(shown) and len(in_fdt) > len(shown)
    for name in os.listdir(copy / "out/sub_fdts"):
        assert read(os.path.join(new.kho, "in/sub_fdts", name)) == \
            (copy / "out/sub_fdts" / name).read_bytes()
    log = kernel_log(new)
    assert REVIVED in log
    assert ("KHO: exec from: 7.1.0-khofs (count 1)" in log) == (abi == "7.1")
    # khofs map reads the copy the same way.
    for source in (copy, snap):
        r = khofs("map", source)
        assert r.returncode == 0, r.stderr
        note = [line for line in r.stdout.splitlines() if line.startswith("note: out/fdt shows")]
        # memblock's regions are in its own blob, whether or not out/fdt shows where it is.
        assert [line.split()[0] for line in r.stdout.splitlines()
                if line.startswith("  oops ")] == ["oops"]
        assert note == [f"note: out/fdt shows {len(shown)} of the FDT's {len(in_fdt)} bytes (its "
                        "size was fixed when the file was made); the rest rebuilt the kernel's "
                        f"way, but where {'kexec-metadata' if abi == '7.1' else 'kho_test'} "
                        "lives is not shown"]


def test_copy_without_a_sub_fdt(tmp_path, copied):
    _, copy = copied
    os.unlink(copy / "out/sub_fdts/memblock")
    one_line_error(khofs("record", tmp_path / "s", "--from", copy),
                   f"{copy}/out/fdt names subtree 'memblock' but out/sub_fdts/memblock is not "
                   "in the recording")
    assert not (tmp_path / "s").exists()


def test_copy_with_a_symlink(tmp_path, copied):
    _, copy = copied
    os.symlink("/etc", copy / "out/sub_fdts/evil")
    one_line_error(khofs("record", tmp_path / "s", "--from", copy),
                   f"{copy}/out/sub_fdts/evil: not a regular file or directory (a kho/ tree has "
                   "only those)")


def test_snapshot_is_private(tmp_path, copied):
    _, copy = copied
    os.umask(old := os.umask(0))
    try:
        assert khofs("record", tmp_path / "s", "--from", copy).returncode == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "s").st_mode) == 0o600


def test_copy_with_a_truncated_sub_fdt(tmp_path, copied):
    _, copy = copied
    os.truncate(copy / "out/sub_fdts/memblock", 100)
    one_line_error(khofs("record", tmp_path / "s", "--from", copy),
                   f"{copy}/out/sub_fdts/memblock: truncated FDT (100 of the 210 bytes its "
                   "header says)")


def test_copy_with_extra_files(mount_khofs, tmp_path, copied):
    m, copy = copied
    shutil.copy(copy / "out/sub_fdts/memblock", copy / "out/sub_fdts/stray")
    (copy / "out/README").write_text("notes\n")
    snap = tmp_path / "s"
    assert khofs("record", snap, "--from", copy).returncode == 0
    with tarfile.open(snap) as tar:
        assert tar.extractfile("kho/out/README").read() == b"notes\n"
    new = mount_khofs("--replay", snap, cmdline="kho=on reserve_mem=4M:4096:oops", name="new")
    assert "khofs: replay: ignored: out/README is not part of a KHO debugfs tree: kept, not " \
        "replayed\n" in new.result.stderr
    assert "khofs: replay: ignored: out/sub_fdts/stray is not named in out/fdt: not handed " \
        "over\n" in new.result.stderr
    assert os.listdir(os.path.join(new.kho, "in/sub_fdts")) == ["memblock"]


def test_copy_with_a_wrong_compatible(mount_khofs, tmp_path, copied):
    _, copy = copied
    fdt = (copy / "out/fdt").read_bytes()
    (copy / "out/fdt").write_bytes(fdt.replace(b"kho-v1\0", b"kho-v2\0"))
    snap = tmp_path / "s"
    assert khofs("record", snap, "--from", copy).returncode == 0
    new = mount_khofs("--replay", snap, cmdline="kho=on reserve_mem=4M:4096:oops", name="new")
    assert os.listdir(new.kho) == ["out"]
    log = kernel_log(new)
    assert [line for line in log if line.startswith("KHO: ")][-2:] == [
        f"KHO: setup: handover FDT ({_root_page(new)}) is incompatible with 'kho-v1': 1",
        "KHO: disabling KHO revival: -22"]
    assert REVIVED not in log


def _root_page(mnt):
    note = status(mnt)["replay"]["not_recorded"][-1]
    assert note.startswith("where the root FDT lived: khofs placed it at 0x")
    return note.rsplit(" ", 1)[1]


def test_the_running_systems_tree(mount_khofs, tmp_path):
    """khofs record with no --from reads /sys/kernel/debug/kho and the running kernel's
    uname -r and /proc/cmdline; a copy of a khofs tree made as this host's kernel would
    stands in for a KHO kernel's debugfs (a khofs mount itself is recorded as its daemon's
    kernel: test_record_namespace.py)."""
    import shutil
    from khofs.kernel.profile import DEFAULT_PROFILE, NO_KHO, get_profile, release_profile_name
    abi = release_profile_name(os.uname().release)
    abi = DEFAULT_PROFILE if abi in (None, NO_KHO) else abi
    m = mount_khofs("--memory", "1G", "--abi", abi, "--release", os.uname().release,
                    cmdline="kho=on reserve_mem=4M:4096:oops")
    if get_profile(abi).has_finalize:
        finalize(m)
    debug = tmp_path / "debug"
    debug.mkdir()
    shutil.copytree(m.kho, debug / "kho", copy_function=shutil.copy2)
    snap = tmp_path / "sys.khosnap"
    script = f"mount --bind {debug} /sys/kernel/debug && exec {' '.join(_khofs_argv())} " \
             f"record {snap}"
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    man = manifest(snap)
    with open("/proc/cmdline") as f:
        cmdline = f.read().strip()
    assert man["source"] == {"kind": "running system", "path": "/sys/kernel/debug/kho"}
    assert (man["release"], man["cmdline"]) == (os.uname().release, cmdline)
    new = mount_khofs("--replay", snap, cmdline="kho=on reserve_mem=4M:4096:oops", name="new")
    st = status(new)
    assert st["previous_release"] == os.uname().release
    assert REVIVED in kernel_log(new)


def _khofs_argv():
    import sys
    return [sys.executable, "-m", "khofs"]


def _old_snapshot(path, version):
    with tarfile.open(path, "w") as tar:
        data = json.dumps({"format": "khofs-snapshot", "version": version}).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def test_bad_snapshots_fail_in_one_line(mount_khofs, tmp_path):
    old = tmp_path / "old.khosnap"
    _old_snapshot(old, 0)
    msg = (f"{old}: snapshot format version 0 is not one this khofs reads (it reads version 1); "
           "record the tree again with this khofs")
    r = mount_khofs("--replay", old, cmdline=None, check=False)
    one_line_error(r.result, msg)
    assert not os.path.ismount(r.path)
    one_line_error(khofs("map", old), msg)
    junk = tmp_path / "junk"
    junk.write_bytes(b"\0junk" * 100)
    one_line_error(mount_khofs("--replay", junk, cmdline=None, check=False, name="b").result,
                   f"{junk}: not a khofs snapshot (not a tar archive)")
    one_line_error(mount_khofs("--replay", tmp_path / "absent", cmdline=None, check=False,
                               name="c").result,
                   f"cannot read {tmp_path / 'absent'}: No such file or directory")


def test_replay_needs_memory_for_the_recorded_addresses(mount_khofs, tmp_path):
    m = mount_khofs("--memory", "8G", cmdline="kho=on reserve_mem=4M:4096:oops")
    finalize(m)
    snap = tmp_path / "s"
    khofs("record", snap, "--from", m)
    r = mount_khofs("--replay", snap, "--memory", "1G", cmdline=None, check=False, name="small")
    assert r.result.returncode == 1
    assert r.result.stderr.startswith("khofs: the recording reaches 0x")
    assert r.result.stderr.endswith(": --memory must be at least that (it is 0x40000000)\n")
    new = mount_khofs("--replay", snap, cmdline=None, name="big")
    assert status(new)["memory_size"] == 8 << 30


def test_replay_into_a_used_state_dir_is_refused(mount_khofs, tmp_path):
    state = tmp_path / "state"
    m = mount_khofs("--memory", "1G", "--state", state, cmdline="kho=on reserve_mem=4M:4096:oops")
    finalize(m)
    snap = tmp_path / "s"
    khofs("record", snap, "--from", m)
    assert khofs("kexec", m).returncode == 0          # the state dir now holds a handover
    khofs("umount", m)
    r = mount_khofs("--replay", snap, "--state", state, cmdline=None, check=False, name="n")
    one_line_error(r.result, f"{state} holds the handover of an earlier kexec: replay into an "
                   "empty --state dir")


def test_mount8_form_takes_replay(tmp_path, mount_khofs):
    m = mount_khofs("--memory", "1G", "--abi", "7.0", cmdline="kho=on reserve_mem=4M:4096:oops")
    finalize(m)
    snap = tmp_path / "s"
    khofs("record", snap, "--from", m)
    mnt = tmp_path / "m8"
    mnt.mkdir()
    mount_khofs.paths.append(str(mnt))
    r = khofs("none", mnt, "-o", f"replay={snap}")
    assert r.returncode == 0, r.stderr
    assert status(mnt)["replay"]["recorded_abi"] == "7.0"
    assert REVIVED in kernel_log(mnt)


def test_map_of_a_snapshot(mount_khofs, tmp_path):
    m = mount_khofs("--memory", "1G", "--abi", "7.1", cmdline="kho=on reserve_mem=4M:4096:oops")
    snap = tmp_path / "s"
    khofs("record", snap, "--from", m)
    r = khofs("map", snap)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"{snap}: physical memory layout (ABI 7.1), RAM 1 GiB"
    assert "  node 0                      [0x000000000000, 0x000040000000)       1 GiB" in lines
    oops = [line for line in lines if line.startswith("  oops ")]
    assert len(oops) == 1 and oops[0].endswith("4 MiB")
    assert [line.split()[0] for line in lines if "out/sub_fdts/" in line] == \
        ["out/sub_fdts/memblock", "out/sub_fdts/kexec-metadata"]
    assert "note: out/fdt: the whole root FDT the recording kept beside the shorter debugfs " \
        "file" in lines
    # what a snapshot cannot show, said plainly (RAM and reserve_mem it does know)
    assert lines[-2:] == [
        "note: not shown, as a kho/ tree does not hold them: the root FDTs' addresses; a khofs "
        "mount's daemon tells them (khofs map MOUNTPOINT)",
        "note: preserved ranges not shown: out/fdt's memory map lives in preserved memory, "
        "which a copy or a snapshot does not hold"]
    svg = tmp_path / "s.svg"
    assert khofs("map", snap, "--svg", svg).returncode == 0
    text = svg.read_text()
    assert re.findall(r'<g id="(band-[^"]+)"', text) == \
        ["band-RAM", "band-scratch", "band-reserve_mem", "band-preserved", "band-FDTs"] * 2
    labels = re.findall(r"<text[^>]*>([^<]*)</text>", text)
    for label in ("node 0", "lowmem", "oops"):
        assert label in labels, label
    assert any(t.endswith(": out/sub_fdts/kexec-metadata") or t == "out/sub_fdts/kexec-metadata"
               for t in labels)
