"""Modes, owners, link counts, sizes and readdir order of the tree (§1, §10, §11)."""

import os
import stat

import pytest

from khoit import ISSUE_ARGS, ISSUE_CMDLINE, read, sh, write_bytes

# Root FDT with one subtree: 196 bytes on a real 6.18.2 kernel (§10). The memblock sub-FDT
# measured 214 there with a region name of 8-11 characters; "oops" pads to 4 bytes less.
ROOT_FDT_SIZE = 196
MEMBLOCK_SIZE = 210


def mode(path):
    return os.stat(path).st_mode


def test_dir_modes_and_nlink(unfinalized):
    m = unfinalized
    root = os.stat(m.path)
    assert stat.S_ISDIR(root.st_mode) and stat.S_IMODE(root.st_mode) == 0o700
    for rel, nlink in (("kho", 3), ("kho/out", 3), ("kho/out/sub_fdts", 2)):
        st = os.stat(os.path.join(m.path, rel))
        assert stat.S_ISDIR(st.st_mode), rel
        assert stat.S_IMODE(st.st_mode) == 0o755, rel
        assert st.st_nlink == nlink, rel
        assert (st.st_uid, st.st_gid) == (0, 0), rel


def test_nlink_does_not_count_files(finalized):
    assert os.stat(os.path.join(finalized.out, "sub_fdts")).st_nlink == 2
    assert os.stat(finalized.out).st_nlink == 3


@pytest.mark.parametrize("name,perm", [("finalize", 0o600), ("scratch_phys", 0o400),
                                       ("scratch_len", 0o400), ("fdt", 0o400),
                                       ("sub_fdts/memblock", 0o400)])
def test_file_modes(finalized, name, perm):
    st = os.stat(os.path.join(finalized.out, name))
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == perm
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert st.st_nlink == 1
    assert st.st_blocks == 0


def test_sizes_are_content_length_by_default(finalized):
    out = finalized.out
    for name in ("finalize", "scratch_phys", "scratch_len", "fdt", "sub_fdts/memblock"):
        p = os.path.join(out, name)
        assert os.stat(p).st_size == len(read(p)), name
    assert os.stat(f"{out}/finalize").st_size == 2
    assert os.stat(f"{out}/scratch_len").st_size == len(b"0x1000000\n0x4000000\n0x1000000\n")
    assert os.stat(f"{out}/fdt").st_size == ROOT_FDT_SIZE
    assert os.stat(f"{out}/sub_fdts/memblock").st_size == MEMBLOCK_SIZE


def test_fdt_size_is_totalsize(finalized):
    blob = read(os.path.join(finalized.out, "fdt"))
    assert int.from_bytes(blob[4:8], "big") == len(blob) == ROOT_FDT_SIZE
    sub = read(os.path.join(finalized.out, "sub_fdts", "memblock"))
    assert int.from_bytes(sub[4:8], "big") == len(sub) == MEMBLOCK_SIZE


def test_readdir_newest_first_unfinalized(unfinalized):
    out = unfinalized.out
    assert os.listdir(out) == ["finalize", "scratch_len", "scratch_phys", "sub_fdts"]
    assert [e.name for e in os.scandir(unfinalized.path)] == ["kho"]
    assert os.listdir(unfinalized.kho) == ["out"]


def test_readdir_newest_first_finalized(finalized):
    out = finalized.out
    assert os.listdir(out) == ["fdt", "finalize", "scratch_len", "scratch_phys", "sub_fdts"]
    assert [e.name for e in os.scandir(out)] == os.listdir(out)
    r = sh(f"find {out} -mindepth 1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().splitlines() == [
        f"{out}/fdt", f"{out}/finalize", f"{out}/scratch_len", f"{out}/scratch_phys",
        f"{out}/sub_fdts", f"{out}/sub_fdts/memblock"]


def test_rewound_dir_fd_lists_current_entries(unfinalized):
    # dcache_readdir walks the live children: a rewound directory stream opened before an
    # abort no longer shows the removed files (os.listdir(fd) rewinds to offset 0).
    out = unfinalized.out
    assert write_bytes(f"{out}/finalize", b"1") == 1
    sub_fd = os.open(f"{out}/sub_fdts", os.O_RDONLY | os.O_DIRECTORY)
    out_fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.listdir(sub_fd) == ["memblock"]
        assert write_bytes(f"{out}/finalize", b"0") == 1
        assert os.listdir(sub_fd) == []
        assert os.listdir(out_fd) == ["finalize", "scratch_len", "scratch_phys", "sub_fdts"]
        assert write_bytes(f"{out}/finalize", b"1") == 1
        assert os.listdir(out_fd) == ["fdt", "finalize", "scratch_len", "scratch_phys",
                                      "sub_fdts"]
    finally:
        os.close(sub_fd)
        os.close(out_fd)


def test_readdir_types(finalized):
    kinds = {e.name: e.is_dir(follow_symlinks=False) for e in os.scandir(finalized.out)}
    assert kinds == {"fdt": False, "finalize": False, "scratch_len": False,
                     "scratch_phys": False, "sub_fdts": True}


def test_fdt_reappears_after_abort_and_finalize(unfinalized):
    out = unfinalized.out
    assert write_bytes(f"{out}/finalize", b"1") == 1
    first = read(f"{out}/fdt")
    assert write_bytes(f"{out}/finalize", b"0") == 1
    assert "fdt" not in os.listdir(out)
    assert write_bytes(f"{out}/finalize", b"1") == 1
    assert os.listdir(out)[0] == "fdt"
    assert len(read(f"{out}/fdt")) == len(first) == ROOT_FDT_SIZE


def test_abort_stamps_the_directories_it_removes_from(unfinalized):
    # debugfs_remove -> simple_recursive_removal: the parent's mtime and ctime, the file's ctime.
    out = unfinalized.out
    assert write_bytes(f"{out}/finalize", b"1") == 1
    before = {d: os.stat(d) for d in (out, f"{out}/sub_fdts")}
    fd = os.open(f"{out}/fdt", os.O_RDONLY)
    try:
        fdt_ctime = os.fstat(fd).st_ctime_ns
        assert write_bytes(f"{out}/finalize", b"0") == 1
        gone = os.fstat(fd)
        assert gone.st_nlink == 0 and gone.st_ctime_ns > fdt_ctime
    finally:
        os.close(fd)
    for d, st in before.items():
        now = os.stat(d)
        assert now.st_mtime_ns > st.st_mtime_ns and now.st_ctime_ns > st.st_ctime_ns, d
        assert now.st_atime_ns == st.st_atime_ns, d


@pytest.fixture(scope="module")
def zmount(module_mounter):
    m = module_mounter("--stat-size", "zero", *ISSUE_ARGS, cmdline=ISSUE_CMDLINE, name="zero")
    assert write_bytes(f"{m.out}/finalize", b"1") == 1
    return m


def test_each_finalize_creates_fresh_inodes(unfinalized):
    # debugfs gives every created file a new inode number (get_next_ino).
    out = unfinalized.out
    fixed = {n: os.stat(f"{out}/{n}").st_ino for n in ("finalize", "scratch_len", "sub_fdts")}
    assert write_bytes(f"{out}/finalize", b"1") == 1
    first = (os.stat(f"{out}/fdt").st_ino, os.stat(f"{out}/sub_fdts/memblock").st_ino)
    assert write_bytes(f"{out}/finalize", b"0") == 1
    assert write_bytes(f"{out}/finalize", b"1") == 1
    second = (os.stat(f"{out}/fdt").st_ino, os.stat(f"{out}/sub_fdts/memblock").st_ino)
    assert first[0] != second[0] and first[1] != second[1]
    assert len(set(first + second + tuple(fixed.values()))) == 7
    assert {n: os.stat(f"{out}/{n}").st_ino for n in fixed} == fixed


class TestStatSizeZero:
    @pytest.mark.parametrize("name", ["finalize", "scratch_phys", "scratch_len", "fdt",
                                      "sub_fdts/memblock"])
    def test_every_file_stats_zero(self, zmount, name):
        st = os.stat(os.path.join(zmount.out, name))
        assert stat.S_ISREG(st.st_mode)
        assert st.st_size == 0
        assert st.st_blocks == 0

    def test_cat_still_prints_content(self, zmount):
        out = zmount.out
        r = sh(f"cd {out} && cat finalize scratch_len")
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"1\n0x1000000\n0x4000000\n0x1000000\n"
        r = sh(f"cat {out}/fdt")
        assert r.returncode == 0, r.stderr
        assert r.stdout[:4] == b"\xd0\x0d\xfe\xed"
        assert len(r.stdout) == int.from_bytes(r.stdout[4:8], "big") == ROOT_FDT_SIZE
        assert r.stdout == read(f"{out}/fdt")

    def test_modes_unchanged(self, zmount):
        assert stat.S_IMODE(mode(f"{zmount.out}/finalize")) == 0o600
        assert stat.S_IMODE(mode(f"{zmount.out}/fdt")) == 0o400
        assert stat.S_IMODE(mode(zmount.path)) == 0o700
