"""VFS operations on the tree behave as on debugfs (§1, §2, §10)."""

import errno
import mmap
import os
import stat
import tempfile
import time
from pathlib import Path

import pytest

from khoit import ISSUE_ARGS, ISSUE_CMDLINE, Mounter, read, sh, wait_until, write_bytes


def expect_errno(code, fn, *args):
    with pytest.raises(OSError) as ei:
        fn(*args)
    assert ei.value.errno == code, os.strerror(ei.value.errno)


# -- namespace changes ----------------------------------------------------------------
@pytest.mark.parametrize("dirname", ["out", "out/sub_fdts"])
def test_create_new_file_is_eacces(unfinalized, dirname):
    d = os.path.join(unfinalized.kho, dirname)
    r = sh(f"touch {d}/new")
    assert r.returncode == 1
    assert "Permission denied" in r.stderr
    expect_errno(errno.EACCES, os.open, f"{d}/new2", os.O_WRONLY | os.O_CREAT, 0o600)
    assert "new" not in os.listdir(d) and "new2" not in os.listdir(d)


@pytest.mark.parametrize("cmd", [
    "mkdir {out}/newdir",
    "rm -f {out}/finalize",
    "rm -f {out}/scratch_len",
    "rmdir {out}/sub_fdts",
    "mv {out}/finalize {out}/finalize2",
    "mv {out}/scratch_len {out}/sub_fdts/",
    "ln -s finalize {out}/link",
    "ln {out}/finalize {out}/hardlink",
    "mknod {out}/fifo p",
])
def test_namespace_change_is_eperm(unfinalized, cmd):
    out = unfinalized.out
    r = sh(cmd.format(out=out))
    assert r.returncode == 1
    assert "Operation not permitted" in r.stderr
    assert os.listdir(out) == ["finalize", "scratch_len", "scratch_phys", "sub_fdts"]
    assert os.listdir(f"{out}/sub_fdts") == []


@pytest.mark.parametrize("op", ["mkdir", "unlink", "rmdir", "rename", "symlink", "link",
                                "mkfifo"])
def test_namespace_syscalls_eperm(finalized, op):
    out = finalized.out
    calls = {
        "mkdir": (os.mkdir, f"{out}/d"),
        "unlink": (os.unlink, f"{out}/fdt"),
        "rmdir": (os.rmdir, f"{out}/sub_fdts"),
        "rename": (os.rename, f"{out}/fdt", f"{out}/fdt2"),
        "symlink": (os.symlink, "fdt", f"{out}/s"),
        "link": (os.link, f"{out}/sub_fdts/memblock", f"{out}/sub_fdts/m2"),
        "mkfifo": (os.mkfifo, f"{out}/p"),
    }
    fn, *args = calls[op]
    expect_errno(errno.EPERM, fn, *args)
    assert os.listdir(out) == ["fdt", "finalize", "scratch_len", "scratch_phys", "sub_fdts"]
    assert os.listdir(f"{out}/sub_fdts") == ["memblock"]


# -- attributes -----------------------------------------------------------------------
def test_chmod_succeeds_and_shows(mount_khofs):
    m = mount_khofs(cmdline="kho=on")
    r = sh(f"chmod 0644 {m.out}/finalize")
    assert (r.returncode, r.stderr) == (0, "")
    st = os.stat(f"{m.out}/finalize")
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644
    assert read(f"{m.out}/finalize") == b"0\n"
    assert write_bytes(f"{m.out}/finalize", b"1") == 1


def test_chmod_dir_succeeds(mount_khofs):
    m = mount_khofs(cmdline="kho=on")
    os.chmod(f"{m.out}/sub_fdts", 0o700)
    st = os.stat(f"{m.out}/sub_fdts")
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700


def test_chown_succeeds_and_shows(mount_khofs):
    m = mount_khofs(cmdline="kho=on")
    r = sh(f"chown 1234:4321 {m.out}/scratch_phys")
    assert (r.returncode, r.stderr) == (0, "")
    st = os.stat(f"{m.out}/scratch_phys")
    assert (st.st_uid, st.st_gid) == (1234, 4321)
    assert stat.S_IMODE(st.st_mode) == 0o400


@pytest.mark.parametrize("change", ["chmod 0644", "chown 1:1", "touch -d @1000000000"])
def test_attribute_change_updates_ctime(mount_khofs, change):
    # notify_change() sets ATTR_CTIME and simple_setattr() copies it; mtime is left alone.
    m = mount_khofs(cmdline="kho=on")
    p = f"{m.out}/scratch_len"
    before = os.stat(p)
    wait_until(lambda: time.time_ns() > before.st_ctime_ns + 10_000_000, what="10 ms")
    r = sh(f"{change} {p}")
    assert (r.returncode, r.stderr) == (0, "")
    after = os.stat(p)
    assert after.st_ctime_ns > before.st_ctime_ns
    if not change.startswith("touch"):
        assert after.st_mtime_ns == before.st_mtime_ns


def test_utimes_succeeds(mount_khofs):
    m = mount_khofs(cmdline="kho=on")
    os.utime(f"{m.out}/finalize", ns=(1_000_000_000, 2_000_000_000))
    st = os.stat(f"{m.out}/finalize")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000, 2_000_000_000)


@pytest.mark.parametrize("state", ["unfinalized", "finalized"])
@pytest.mark.parametrize("name", ["finalize", "scratch_len"])
def test_truncate_succeeds_and_changes_nothing(request, state, name):
    m = request.getfixturevalue(state)
    p = f"{m.out}/{name}"
    before = read(p)
    r = sh(f"truncate -s 0 {p}")
    assert (r.returncode, r.stderr) == (0, "")
    os.truncate(p, 0)
    assert read(p) == before
    assert os.stat(p).st_size == len(before)


def test_truncate_blob_changes_nothing(finalized):
    p = f"{finalized.out}/fdt"
    before = read(p)
    os.truncate(p, 0)
    assert read(p) == before


# -- file operations ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["scratch_phys", "scratch_len"])
def test_write_without_handler_is_einval(unfinalized, name):
    p = f"{unfinalized.out}/{name}"
    before = read(p)
    fd = os.open(p, os.O_WRONLY)
    try:
        expect_errno(errno.EINVAL, os.write, fd, b"0x0\n")
    finally:
        os.close(fd)
    r = sh(f"echo 0 > {p}")
    assert r.returncode == 1
    assert "write error: Invalid argument" in r.stderr
    assert read(p) == before


@pytest.mark.parametrize("whence", [os.SEEK_SET, os.SEEK_CUR, os.SEEK_END])
def test_finalize_lseek_is_espipe(unfinalized, whence):
    fd = os.open(f"{unfinalized.out}/finalize", os.O_RDONLY)
    try:
        expect_errno(errno.ESPIPE, os.lseek, fd, 0, whence)
    finally:
        os.close(fd)


def test_finalize_pread_pwrite_are_espipe(unfinalized):
    fd = os.open(f"{unfinalized.out}/finalize", os.O_RDWR)
    try:
        expect_errno(errno.ESPIPE, os.pread, fd, 2, 0)
        expect_errno(errno.ESPIPE, os.pwrite, fd, b"1", 0)
    finally:
        os.close(fd)
    assert read(f"{unfinalized.out}/finalize") == b"0\n"


@pytest.mark.parametrize("name", ["finalize", "scratch_len", "fdt", "sub_fdts/memblock"])
def test_mmap_shared_is_enodev(finalized, name):
    fd = os.open(f"{finalized.out}/{name}", os.O_RDONLY)
    try:
        expect_errno(errno.ENODEV, mmap.mmap, fd, 2, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)


def test_finalize_read_byte_by_byte(unfinalized):
    fd = os.open(f"{unfinalized.out}/finalize", os.O_RDONLY)
    try:
        assert [os.read(fd, 1) for _ in range(4)] == [b"0", b"\n", b"", b""]
    finally:
        os.close(fd)


def test_scratch_reads_at_any_offset(unfinalized):
    p = f"{unfinalized.out}/scratch_len"
    whole = read(p)
    fd = os.open(p, os.O_RDONLY)
    try:
        assert os.pread(fd, 5, 10) == whole[10:15]
        assert os.lseek(fd, 3, os.SEEK_SET) == 3
        assert os.read(fd, 100) == whole[3:]
    finally:
        os.close(fd)


def test_blob_write_in_place(mount_khofs):
    m = mount_khofs(*ISSUE_ARGS, cmdline=ISSUE_CMDLINE)
    assert write_bytes(f"{m.out}/finalize", b"1") == 1
    p = f"{m.out}/fdt"
    before = read(p)
    assert before[:4] == b"\xd0\x0d\xfe\xed"
    r = sh(f"echo 1 > {p}")
    assert (r.returncode, r.stderr) == (0, "")
    after = read(p)
    assert after[:2] == b"\x31\x0a"
    assert after[2:] == before[2:]
    r = sh(f"od -An -tx1 {p} | head -1")
    assert r.stdout.split()[:4] == [b"31", b"0a", b"fe", b"ed"]


def test_blob_write_past_end_returns_zero(mount_khofs):
    m = mount_khofs(*ISSUE_ARGS, cmdline=ISSUE_CMDLINE)
    assert write_bytes(f"{m.out}/finalize", b"1") == 1
    p = f"{m.out}/sub_fdts/memblock"
    before = read(p)
    fd = os.open(p, os.O_WRONLY)
    try:
        # Within the blob, a write is clipped at its end; at the end nothing is written.
        assert os.pwrite(fd, b"ABCD", len(before) - 2) == 2
        assert os.pwrite(fd, b"XY", len(before)) == 0
    finally:
        os.close(fd)
    assert read(p) == before[:-2] + b"AB"


def test_touch_existing_file_succeeds(unfinalized):
    p = f"{unfinalized.out}/finalize"
    r = sh(f"touch -d @1000000000 {p}")
    assert (r.returncode, r.stderr) == (0, "")
    assert os.stat(p).st_mtime == 1000000000
    assert read(p) == b"0\n"


def test_read_of_removed_blob_is_eio(mount_khofs):
    m = mount_khofs(*ISSUE_ARGS, cmdline=ISSUE_CMDLINE)
    assert write_bytes(f"{m.out}/finalize", b"1") == 1
    fds = [os.open(f"{m.out}/{n}", os.O_RDONLY) for n in ("fdt", "sub_fdts/memblock")]
    try:
        assert write_bytes(f"{m.out}/finalize", b"0") == 1
        # debugfs_file_get() fails on a removed file; a new finalize does not revive it.
        assert write_bytes(f"{m.out}/finalize", b"1") == 1
        for fd in fds:
            expect_errno(errno.EIO, os.read, fd, 16)
    finally:
        for fd in fds:
            os.close(fd)
    assert read(f"{m.out}/fdt")[:4] == b"\xd0\x0d\xfe\xed"


def test_fstat_of_removed_blob(mount_khofs):
    # The inode outlives its removal while open: fstat works and shows nlink 0.
    m = mount_khofs(*ISSUE_ARGS, cmdline=ISSUE_CMDLINE)
    assert write_bytes(f"{m.out}/finalize", b"1") == 1
    fd = os.open(f"{m.out}/sub_fdts/memblock", os.O_RDONLY)
    try:
        assert os.fstat(fd).st_nlink == 1
        assert write_bytes(f"{m.out}/finalize", b"0") == 1
        st = os.fstat(fd)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o400
        assert st.st_nlink == 0
    finally:
        os.close(fd)


def as_nobody(cmd):
    return sh(f"setpriv --reuid=65534 --regid=65534 --clear-groups bash -c '{cmd}'")


@pytest.fixture
def public_mount():
    """A mount whose parent directories other users may traverse (pytest's tmp is 0700)."""
    base = tempfile.mkdtemp(prefix="khofs-it-", dir="/tmp")
    os.chmod(base, 0o755)
    m = Mounter(Path(base))
    try:
        yield m("-o", "allow_other", cmdline="kho=on")
    finally:
        m.cleanup()
        for d in m.paths + [base]:
            try:
                os.rmdir(d)
            except OSError:
                pass


def test_non_root_blocked_by_root_dir_mode(public_mount):
    m = public_mount
    r = as_nobody(f"ls {os.path.dirname(m.path)}")
    assert r.returncode == 0, r.stderr
    r = as_nobody(f"ls {m.path}")
    assert r.returncode != 0
    assert "Permission denied" in r.stderr


def test_non_root_open_is_eacces(public_mount):
    m = public_mount
    os.chmod(m.path, 0o755)
    r = as_nobody(f"ls {m.out}")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"finalize\nscratch_len\nscratch_phys\nsub_fdts\n"
    for name in ("finalize", "scratch_len", "scratch_phys"):
        r = as_nobody(f"cat {m.out}/{name}")
        assert r.returncode == 1
        assert "Permission denied" in r.stderr
    r = as_nobody(f"echo 1 > {m.out}/finalize")
    assert r.returncode == 1
    assert "Permission denied" in r.stderr
    assert read(f"{m.out}/finalize") == b"0\n"


@pytest.mark.parametrize("stat_size", ["content", "zero"])
def test_append_to_a_blob_writes_at_the_file_position(mount_khofs, stat_size):
    """debugfs blobs have a ->write with no append mode: `>>` writes at the open's position
    (0), and one descriptor moves on from there; nothing loops on a zero-byte write."""
    m = mount_khofs(*ISSUE_ARGS, "--stat-size", stat_size, cmdline=ISSUE_CMDLINE)
    assert write_bytes(os.path.join(m.out, "finalize"), b"1") == 1
    blob = os.path.join(m.out, "sub_fdts", "memblock")
    before = read(blob)
    r = sh(f"printf AB >> {blob}; printf CD >> {blob}", timeout=10)
    assert r.returncode == 0, r.stderr
    assert read(blob) == b"CD" + before[2:]
    r = sh(f"exec 3>>{blob}; printf EF >&3; printf GH >&3", timeout=10)
    assert r.returncode == 0, r.stderr
    assert read(blob) == b"EFGH" + before[4:]
