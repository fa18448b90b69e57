"""The debugfs node tree (KHO-SPEC §1-§3, §10): modes, links, listing order, file semantics."""

import errno
import stat

import pytest

from khofs.fs.debugfs import Tree
from khofs.kernel.errors import KernelError
from khofs.kernel.machine import Machine, MachineConfig

G = 1 << 30


def tree(cmdline="kho=on", **cfg):
    cfg.setdefault("memory", G)
    return Tree(Machine(cmdline, MachineConfig(**cfg)))


def errno_of(fn, *args):
    with pytest.raises(KernelError) as ei:
        fn(*args)
    return ei.value.errno


def names(t, path):
    return [n.name for n in t.listdir(t.resolve(path))]


def fin(t):
    return t.resolve("kho/out/finalize")


def write_finalize(t, data, off=0):
    return fin(t).open().write(off, data)


def finalized(t):
    return t.machine.kho_out.finalized


# -- shape --------------------------------------------------------------------------------------

def test_modes():
    t = tree("kho=on reserve_mem=4M:4K:foo")
    write_finalize(t, b"1")
    expect = {
        "": stat.S_IFDIR | 0o700,
        "kho": stat.S_IFDIR | 0o755,
        "kho/out": stat.S_IFDIR | 0o755,
        "kho/out/sub_fdts": stat.S_IFDIR | 0o755,
        "kho/out/finalize": stat.S_IFREG | 0o600,
        "kho/out/scratch_phys": stat.S_IFREG | 0o400,
        "kho/out/scratch_len": stat.S_IFREG | 0o400,
        "kho/out/fdt": stat.S_IFREG | 0o400,
        "kho/out/sub_fdts/memblock": stat.S_IFREG | 0o400,
    }
    for path, mode in expect.items():
        node = t.resolve(path)
        assert node.mode == mode, path
        assert (node.uid, node.gid) == (0, 0)


def test_nlink():
    t = tree()
    assert t.resolve("kho").nlink() == 3
    assert t.resolve("kho/out").nlink() == 3
    assert t.resolve("kho/out/sub_fdts").nlink() == 2
    assert t.root.nlink() == 3
    write_finalize(t, b"1")
    assert t.resolve("kho/out").nlink() == 3


def test_listing_newest_first():
    t = tree("kho=on reserve_mem=4M:4K:foo")
    assert names(t, "") == ["kho"]
    assert names(t, "kho") == ["out"]
    assert names(t, "kho/out") == ["finalize", "scratch_len", "scratch_phys", "sub_fdts"]
    assert names(t, "kho/out/sub_fdts") == []
    write_finalize(t, b"1")
    assert names(t, "kho/out") == ["fdt", "finalize", "scratch_len", "scratch_phys", "sub_fdts"]
    assert names(t, "kho/out/sub_fdts") == ["memblock"]
    write_finalize(t, b"0")
    assert names(t, "kho/out") == ["finalize", "scratch_len", "scratch_phys", "sub_fdts"]
    assert names(t, "kho/out/sub_fdts") == []


@pytest.mark.parametrize("cmdline", ["kho=off", "quiet", "kho=on kho_scratch=2G,1G,1G"])
def test_no_kho_no_children(cmdline):
    t = tree(cmdline)
    assert t.listdir(t.root) == []
    assert t.root.nlink() == 2
    assert errno_of(t.resolve, "kho") == errno.ENOENT


def test_lookup_errors():
    t = tree()
    assert errno_of(t.resolve, "kho/out/fdt") == errno.ENOENT
    assert errno_of(t.resolve, "kho/in") == errno.ENOENT
    assert errno_of(t.resolve, "kho/out/finalize/x") == errno.ENOTDIR


# -- finalize: reads -----------------------------------------------------------------------------

def test_finalize_read_text():
    t = tree()
    h = fin(t).open()
    assert h.read(0, 100) == b"0\n"
    write_finalize(t, b"1")
    assert h.read(0, 100) == b"1\n"
    assert h.read(2, 100) == b""


def test_finalize_read_continues_captured_text():
    t = tree()
    h = fin(t).open()
    assert h.read(0, 1) == b"0"
    write_finalize(t, b"1")
    assert h.read(1, 10) == b"\n"        # later offsets: the text this handle captured
    assert h.read(0, 10) == b"1\n"       # offset 0 re-evaluates
    write_finalize(t, b"0")
    assert h.read(1, 10) == b"\n"
    assert h.read(0, 1) == b"0"


def test_finalize_first_read_at_nonzero_offset_evaluates():
    t = tree()
    write_finalize(t, b"1")
    h = fin(t).open()
    assert h.read(1, 10) == b"\n"
    assert h.read(0, 10) == b"1\n"


# -- finalize: writes (KHO-SPEC §2 table) -------------------------------------------------------------

@pytest.mark.parametrize("data", [b"1", b"1\n", b"1\0", b"0x1", b"+1", b"01", b"2",
                                  b"0" * 22 + b"1", b"1\0" + b"junk" * 10, b"18446744073709551615"])
def test_write_finalizes(data):
    t = tree()
    assert write_finalize(t, data) == len(data)
    assert finalized(t)
    assert errno_of(write_finalize, t, data) == errno.EEXIST


@pytest.mark.parametrize("data", [b"0", b"00", b"0x0", b"+0", b"0\n", b"0" * 23 + b"1",
                                  b"0" * 30 + b"1"])
def test_write_aborts(data):
    t = tree()
    assert errno_of(write_finalize, t, data) == errno.ENOENT
    write_finalize(t, b"1")
    assert write_finalize(t, data) == len(data)
    assert not finalized(t)


@pytest.mark.parametrize("data", [b" 1", b"1 ", b"1\r\n", b"1\n\n", b"-1", b"abc", b"y", b"0x",
                                  b"08", b"", b"1\n" + b"x" * 30])
def test_write_invalid(data):
    t = tree()
    assert errno_of(write_finalize, t, data) == errno.EINVAL
    assert not finalized(t)
    write_finalize(t, b"1")
    # parsing comes before the state check
    assert errno_of(write_finalize, t, data) == errno.EINVAL
    assert finalized(t)


def test_write_overflow_is_erange():
    t = tree()
    assert errno_of(write_finalize, t, b"18446744073709551616") == errno.ERANGE
    assert not finalized(t)


def test_write_long_input_returns_full_length():
    t = tree()
    data = b"0" * 22 + b"1" + b"\n" * 77
    assert write_finalize(t, data) == 100
    assert finalized(t)


def test_write_offset_ignored():
    t = tree()
    assert write_finalize(t, b"1", off=1000) == 1
    assert finalized(t)


# -- scratch files ----------------------------------------------------------------------------------

def test_scratch_files_read_at_any_offset():
    t = tree("kho=on kho_scratch=16M,64M,16M")
    h = t.resolve("kho/out/scratch_len").open()
    text = b"0x1000000\n0x4000000\n0x1000000\n"
    assert h.read(0, 4096) == text
    assert h.read(3, 5) == text[3:8]
    assert h.read(len(text), 10) == b""
    ph = t.resolve("kho/out/scratch_phys").open()
    assert ph.read(0, 4096) == t.machine.scratch_phys_text()


@pytest.mark.parametrize("name", ["scratch_len", "scratch_phys"])
def test_scratch_write_is_einval(name):
    t = tree()
    h = t.resolve(f"kho/out/{name}").open()
    before = h.read(0, 4096)
    assert errno_of(h.write, 0, b"0x0\n") == errno.EINVAL
    assert h.read(0, 4096) == before


# -- blobs ----------------------------------------------------------------------------------------------

def test_blob_read():
    t = tree("kho=on reserve_mem=4M:4K:foo")
    write_finalize(t, b"1")
    out = t.machine.kho_out
    h = t.resolve("kho/out/fdt").open()
    assert h.read(0, 1 << 20) == out.root_fdt()
    assert h.read(190, 100) == out.root_fdt()[190:]
    assert h.read(196, 10) == b""
    sub = out.blobs("sub_fdts")[0]
    sh = t.resolve("kho/out/sub_fdts/memblock").open()
    assert sh.read(0, 4096) == t.machine.mem.read(sub.phys, sub.size)


def test_blob_write_in_place():
    t = tree()
    write_finalize(t, b"1")
    out = t.machine.kho_out
    h = t.resolve("kho/out/fdt").open()
    mem = t.machine.mem
    orig = out.root_fdt()
    page = mem.read(out.fdt_page, 4096)
    assert h.write(0, b"1\n") == 2
    assert mem.read(out.fdt_page, 4) == b"1\n" + orig[2:4]
    assert h.read(0, 4) == b"1\n" + orig[2:4]
    assert h.write(150, b"abcd") == 2          # clipped at the blob's size (152)
    assert mem.read(out.fdt_page + 150, 2) == b"ab"
    assert mem.read(out.fdt_page + 152, 4096 - 152) == page[152:]
    assert h.write(152, b"x") == 0             # past the end
    assert h.write(5000, b"x") == 0
    assert h.read(0, 4096)[150:] == b"ab"


def test_removed_blob_read_is_eio():
    t = tree()
    write_finalize(t, b"1")
    h = t.resolve("kho/out/fdt").open()
    write_finalize(t, b"0")
    assert errno_of(h.read, 0, 10) == errno.EIO
    assert errno_of(h.write, 0, b"x") == errno.EIO


def test_removed_blob_read_is_eio_after_a_lookup():
    t = tree()
    write_finalize(t, b"1")
    h = t.resolve("kho/out/fdt").open()
    write_finalize(t, b"0")
    assert errno_of(t.resolve, "kho/out/fdt") == errno.ENOENT
    assert errno_of(h.read, 0, 10) == errno.EIO


def test_new_inode_after_abort_and_finalize():
    t = tree("kho=on reserve_mem=4M:4K:foo")
    write_finalize(t, b"1")
    fdt1 = t.resolve("kho/out/fdt").ino
    sub1 = t.resolve("kho/out/sub_fdts/memblock").ino
    write_finalize(t, b"0")
    write_finalize(t, b"1")
    fdt2 = t.resolve("kho/out/fdt").ino
    sub2 = t.resolve("kho/out/sub_fdts/memblock").ino
    assert len({fdt1, sub1, fdt2, sub2}) == 4
    assert errno_of(t.get, fdt1) == errno.ENOENT
    assert t.get(fdt2).name == "fdt"


def test_fixed_nodes_keep_their_inodes():
    t = tree()
    inos = [t.resolve(p).ino for p in ("kho", "kho/out", "kho/out/finalize", "kho/out/sub_fdts")]
    write_finalize(t, b"1")
    write_finalize(t, b"0")
    assert [t.resolve(p).ino for p in ("kho", "kho/out", "kho/out/finalize",
                                        "kho/out/sub_fdts")] == inos
    assert len(set(inos)) == 4


# -- kho/in after a KHO kexec ---------------------------------------------------------------------------

def test_in_tree_after_kexec():
    old = Machine("kho=on reserve_mem=4M:4K:foo", MachineConfig(memory=G))
    old.kho_out.set_finalize(1)
    root_fdt = old.kho_out.root_fdt()
    sub = old.kho_out.blobs("sub_fdts")[0]
    sub_fdt = old.mem.read(sub.phys, sub.size)
    old.kexec_load()
    ho = old.kexec_exec()
    t = Tree(Machine(ho.cmdline, MachineConfig(**ho.config), handover=ho))
    assert t.resolve("kho").nlink() == 4
    assert set(names(t, "kho")) == {"in", "out"}
    assert set(names(t, "kho/in")) == {"fdt", "sub_fdts"}
    assert names(t, "kho/in/sub_fdts") == ["memblock"]
    assert t.resolve("kho/in").mode == stat.S_IFDIR | 0o755
    assert t.resolve("kho/in/fdt").mode == stat.S_IFREG | 0o400
    assert t.resolve("kho/in/fdt").open().read(0, 4096) == root_fdt
    assert t.resolve("kho/in/sub_fdts/memblock").open().read(0, 4096) == sub_fdt
    # out/ starts unfinalized with an empty sub_fdts/
    assert fin(t).open().read(0, 10) == b"0\n"
    assert names(t, "kho/out/sub_fdts") == []
