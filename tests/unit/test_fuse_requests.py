"""khofs.fuse: FUSE request bytes in, the reply bytes libfuse would have sent out.

Layouts from include/uapi/linux/fuse.h: fuse_in_header 40 bytes, fuse_out_header 16,
fuse_entry_out 40 + fuse_attr 88, fuse_open_out 16, fuse_direntplus 152 + name padded to 8.
"""

import errno
import os
import stat
import struct
import time

import pytest

from khofs import fuse
from khofs.debugfs import Tree
from khofs.host import Host
from khofs.kernel.errors import KernelError
from khofs.kernel.machine import MachineConfig

UID = 0


def req(opcode, nodeid=1, payload=b"", unique=7, uid=UID):
    body = payload
    head = struct.pack("<IIQQIIIHH", 40 + len(body), opcode, unique, nodeid, uid, 0, 1234, 0, 0)
    return bytearray(head + body), 40 + len(body)


def out(reply):
    length, err, unique = struct.unpack_from("<IiQ", reply)
    assert length == len(reply)
    return -err, unique, reply[16:]


def attr_of(payload):
    f = struct.unpack("<QQQqqqIIIIIIIIII", payload)
    keys = ("ino size blocks atime mtime ctime atimensec mtimensec ctimensec mode nlink "
            "uid gid rdev blksize flags").split()
    return dict(zip(keys, f))


@pytest.fixture
def host():
    return Host.boot("kho=on reserve_mem=4M:4096:oops", MachineConfig())


@pytest.fixture
def kf(host):
    return fuse.KhoFuse(host.tree)


def lookup(kf, parent, name):
    err, _, body = out(kf.handle(*req(fuse.LOOKUP, parent, name.encode() + b"\0")))
    assert err == 0, err
    return struct.unpack_from("<QQQQII", body), attr_of(body[40:])


def test_lookup_entry_layout(kf, host):
    (nodeid, gen, ev, av, evn, avn), a = lookup(kf, 1, "kho")
    assert (nodeid, gen, ev, av, evn, avn) == (host.tree.kho.ino, 0, 60, 60, 0, 0)
    assert a["ino"] == nodeid and a["mode"] == stat.S_IFDIR | 0o755
    assert (a["nlink"], a["size"], a["blocks"], a["blksize"], a["rdev"], a["flags"]) == (3, 0, 0, 4096, 0, 0)
    assert a["atime"] * 10**9 + a["atimensec"] == host.tree.kho.atime


def test_lookup_missing_dot_and_dotdot(kf, host):
    err, unique, body = out(kf.handle(*req(fuse.LOOKUP, 1, b"nope\0", unique=99)))
    assert (err, unique, body) == (errno.ENOENT, 99, b"")
    kho = host.tree.kho.ino
    assert lookup(kf, kho, ".")[0][0] == kho
    assert lookup(kf, kho, "..")[0][0] == 1


def test_file_attributes_and_removed_file(kf, host):
    fin = host.tree.finalize
    err, _, body = out(kf.handle(*req(fuse.GETATTR, fin.ino, bytes(16))))
    assert err == 0 and struct.unpack_from("<QII", body) == (60, 0, 0)
    a = attr_of(body[16:])
    assert (a["mode"], a["nlink"], a["size"]) == (stat.S_IFREG | 0o600, 1, 2)
    zero = fuse.KhoFuse(host.tree, stat_size="zero")
    assert attr_of(out(zero.handle(*req(fuse.GETATTR, fin.ino, bytes(16))))[2][16:])["size"] == 0
    assert out(kf.handle(*req(fuse.GETATTR, 10**6, bytes(16))))[0] == errno.ENOENT


def open_fh(kf, ino, flags=os.O_RDONLY):
    err, _, body = out(kf.handle(*req(fuse.OPEN, ino, struct.pack("<II", flags, 0))))
    assert err == 0, err
    return struct.unpack("<QIi", body)


def read(kf, ino, fh, off=0, size=4096):
    return out(kf.handle(*req(fuse.READ, ino, struct.pack("<QQIIQII", fh, off, size, 0, 0, 0, 0))))


def write(kf, ino, fh, data, off=0):
    return kf.handle(*req(fuse.WRITE, ino, struct.pack("<QQIIQII", fh, off, len(data), 0, 0, 0, 0) + data))


def test_open_read_release(kf, host):
    fin = host.tree.finalize
    fh, flags, _ = open_fh(kf, fin.ino)
    assert flags == fuse.FOPEN_DIRECT_IO | fuse.FOPEN_NONSEEKABLE      # simple_attr: no seeking
    assert read(kf, fin.ino, fh) == (0, 7, b"0\n")
    assert read(kf, fin.ino, fh, off=2) == (0, 7, b"")
    sp = host.tree.scratch_phys
    fh2, flags2, _ = open_fh(kf, sp.ino)
    assert flags2 == fuse.FOPEN_DIRECT_IO and fh2 != fh
    assert read(kf, sp.ino, fh2, size=4)[2] == host.machine.scratch_phys_text()[:4]
    assert out(kf.handle(*req(fuse.RELEASE, fin.ino, struct.pack("<QIIQ", fh, 0, 0, 0)))) == (0, 7, b"")
    assert fh not in kf.handles and fh2 in kf.handles
    err, _, _ = out(kf.handle(*req(fuse.OPEN, host.tree.kho.ino, bytes(8))))
    assert err == errno.EISDIR


def test_write_then_abort_is_answered_after_invalidation(kf, host):
    fin = host.tree.finalize
    fh = open_fh(kf, fin.ino, os.O_WRONLY)[0]
    err, _, body = out(write(kf, fin.ino, fh, b"1\n"))
    assert err == 0 and struct.unpack("<II", body) == (2, 0)
    fdt = host.tree.resolve("kho/out/fdt")
    assert out(write(kf, fin.ino, fh, b"1\n"))[0] == errno.EEXIST     # nothing removed
    assert kf.deferred == []
    # The abort removes out/fdt and out/sub_fdts/memblock: no reply until they are forgotten.
    assert write(kf, fin.ino, fh, b"0\n", ) is None
    [(unique, reply, removed)] = kf.deferred
    assert out(reply) == (0, 7, struct.pack("<II", 2, 0))
    assert (host.tree.out.ino, "fdt", fdt.ino) in removed and len(removed) == 2


def test_bad_write_is_an_error_reply(kf, host):
    fin = host.tree.finalize
    fh = open_fh(kf, fin.ino, os.O_WRONLY)[0]
    assert out(write(kf, fin.ino, fh, b"x\n"))[0] == errno.EINVAL
    sp = host.tree.scratch_phys
    fh = open_fh(kf, sp.ino)[0]
    assert out(write(kf, sp.ino, fh, b"1"))[0] == errno.EINVAL


def test_setattr_mode_times_and_now(kf, host):
    fin = host.tree.finalize
    valid = fuse.FATTR_MODE | fuse.FATTR_ATIME | fuse.FATTR_MTIME_NOW
    payload = struct.pack("<IIQQQqqqIIIIIIII", valid, 0, 0, 0, 0, -5, 0, 0, 7, 0, 0,
                          0o100644, 0, 0, 0, 0)
    fin.mtime = fin.ctime = 0
    before = time.time_ns()
    err, _, body = out(kf.handle(*req(fuse.SETATTR, fin.ino, payload)))
    a = attr_of(body[16:])
    assert err == 0 and a["mode"] == stat.S_IFREG | 0o644
    assert fin.atime == -5 * 10**9 + 7 and (a["atime"], a["atimensec"]) == (-5, 7)
    assert fin.mtime >= before and fin.ctime >= before


def test_readdirplus_records_and_continuation(kf, host):
    out_dir = host.tree.out
    err, _, body = out(kf.handle(*req(fuse.OPENDIR, out_dir.ino, bytes(8))))
    fh = struct.unpack("<QIi", body)[0]

    def readdir(off, size):
        err, _, body = out(kf.handle(*req(fuse.READDIRPLUS, out_dir.ino,
                                          struct.pack("<QQIIQII", fh, off, size, 0, 0, 0, 0))))
        assert err == 0
        names, pos = [], 0
        while pos < len(body):
            nodeid = struct.unpack_from("<Q", body, pos)[0]
            ino, nxt, namelen, typ = struct.unpack_from("<QQII", body, pos + 128)
            name = body[pos + 152:pos + 152 + namelen].decode()
            assert nodeid == ino and body[pos + 152 + namelen:pos + (152 + namelen + 7) // 8 * 8].strip(b"\0") == b""
            names.append((name, nxt, typ))
            pos += (152 + namelen + 7) // 8 * 8
        return names, len(body)

    names, _ = readdir(0, 4096)
    assert [n for n, _, _ in names] == [".", "..", "finalize", "scratch_len", "scratch_phys", "sub_fdts"]
    assert [o for _, o, _ in names] == [1, 2, 3, 4, 5, 6]
    assert [t for _, _, t in names] == [4, 4, 8, 8, 8, 4]
    # A buffer that holds two records gets two; the rest follows from the last offset.
    first, used = readdir(0, 2 * 160 + 100)
    assert [n for n, _, _ in first] == [".", ".."] and used == 320
    rest, _ = readdir(2, 4096)
    assert [n for n, _, _ in rest] == ["finalize", "scratch_len", "scratch_phys", "sub_fdts"]
    assert out(kf.handle(*req(fuse.RELEASEDIR, out_dir.ino, struct.pack("<QIIQ", fh, 0, 0, 0))))[0] == 0
    assert fh not in kf.dir_handles
    assert out(kf.handle(*req(fuse.OPENDIR, host.tree.finalize.ino, bytes(8))))[0] == errno.ENOTDIR


@pytest.mark.parametrize("opcode,expected", [
    (fuse.MKDIR, errno.EPERM), (fuse.UNLINK, errno.EPERM), (fuse.RENAME2, errno.EPERM),
    (fuse.SYMLINK, errno.EPERM), (fuse.LINK, errno.EPERM), (fuse.MKNOD, errno.EPERM),
    (fuse.RMDIR, errno.EPERM), (fuse.RENAME, errno.EPERM), (fuse.CREATE, errno.EACCES),
    (fuse.FSYNC, errno.EINVAL), (fuse.FLUSH, errno.ENOSYS), (fuse.READLINK, errno.ENOSYS),
    (fuse.READDIR, errno.ENOSYS), (22, errno.ENOSYS), (23, errno.ENOSYS), (34, errno.ENOSYS),
    (fuse.FSYNCDIR, errno.ENOSYS), (40, errno.ENOSYS), (46, errno.ENOSYS), (999, errno.ENOSYS),
])
def test_refused_operations(kf, opcode, expected):
    assert out(kf.handle(*req(opcode, 1, bytes(64)))) == (expected, 7, b"")


def test_statfs(kf):
    err, _, body = out(kf.handle(*req(fuse.STATFS, 1)))
    assert err == 0 and len(body) == 80
    assert struct.unpack_from("<QQQQQIII", body) == (0, 0, 0, 0, 0, 4096, 255, 4096)


def test_no_reply_requests_and_forget(kf, host):
    fin = host.tree.finalize
    fh = open_fh(kf, fin.ino, os.O_WRONLY)[0]
    write(kf, fin.ino, fh, b"1\n")
    fdt = host.tree.resolve("kho/out/fdt")
    lookup(kf, host.tree.out.ino, "fdt")
    write(kf, fin.ino, fh, b"0\n")
    assert fdt.ino in host.tree.nodes                        # removed, still looked up
    assert kf.handle(*req(fuse.INTERRUPT, 0, struct.pack("<Q", 7))) is None
    assert kf.handle(*req(fuse.BATCH_FORGET, 0, struct.pack("<II", 1, 0) + struct.pack("<QQ", fdt.ino, 1))) is None
    assert fdt.ino not in host.tree.nodes
    assert kf.handle(*req(fuse.FORGET, host.tree.kho.ino, struct.pack("<Q", 1))) is None
    assert host.tree.kho.ino in host.tree.nodes              # a live node stays
    assert out(kf.handle(*req(fuse.DESTROY, 0))) == (0, 7, b"")


def test_allow_root_lets_only_owner_root_and_open_files_through(host):
    kf = fuse.KhoFuse(host.tree, deny_others=True, owner=1000)
    assert out(kf.handle(*req(fuse.LOOKUP, 1, b"kho\0", uid=1000)))[0] == 0
    assert out(kf.handle(*req(fuse.LOOKUP, 1, b"kho\0", uid=0)))[0] == 0
    assert out(kf.handle(*req(fuse.LOOKUP, 1, b"kho\0", uid=1001)))[0] == errno.EACCES
    assert out(kf.handle(*req(999, 1, uid=1001)))[0] == errno.EACCES
    assert out(kf.handle(*req(999, 1, uid=1000)))[0] == errno.ENOSYS
    fh = open_fh(kf, host.tree.scratch_len.ino)[0]
    err, _, _ = out(kf.handle(*req(fuse.READ, host.tree.scratch_len.ino,
                                   struct.pack("<QQIIQII", fh, 0, 2, 0, 0, 0, 0), uid=1001)))
    assert err == 0


def test_interrupted_open_drops_its_handle(kf, host):
    fh = open_fh(kf, host.tree.finalize.ino)[0]
    kf.dropped(12345)                       # some other request
    assert fh in kf.handles
    kf.dropped(7)
    assert fh not in kf.handles


def test_internal_error_is_eio(kf, host, monkeypatch, capsys):
    def boom(*a):
        raise ZeroDivisionError
    monkeypatch.setattr(Tree, "lookup", boom)
    assert out(kf.handle(*req(fuse.LOOKUP, 1, b"kho\0")))[0] == errno.EIO
    assert "ZeroDivisionError" in capsys.readouterr().err


def test_kernel_errors_carry_their_errno(kf, monkeypatch):
    def busy(*a):
        raise KernelError(errno.EBUSY)
    monkeypatch.setattr(Tree, "lookup", busy)
    assert out(kf.handle(*req(fuse.LOOKUP, 1, b"kho\0")))[0] == errno.EBUSY


def test_setattr_with_an_explicit_time_stores_it(kf, host):
    # What the kernel sends for touch/utimensat: the time, with or without the _NOW bit.
    fin = host.tree.finalize
    valid = fuse.FATTR_MTIME | fuse.FATTR_MTIME_NOW
    payload = struct.pack("<IIQQQqqqIIIIIIII", valid, 0, 0, 0, 0, 0, 1234, 0, 0, 56, 0,
                          0, 0, 0, 0, 0)
    assert out(kf.handle(*req(fuse.SETATTR, fin.ino, payload)))[0] == 0
    assert fin.mtime == 1234 * 10**9 + 56


def test_lookup_of_a_name_longer_than_name_max(kf, host):
    kho = host.tree.kho.ino
    assert out(kf.handle(*req(fuse.LOOKUP, kho, b"x" * 255 + b"\0")))[0] == errno.ENOENT
    assert out(kf.handle(*req(fuse.LOOKUP, kho, b"x" * 256 + b"\0")))[0] == errno.ENAMETOOLONG


def test_allow_root_answers_others_readdir_and_fsyncdir_as_libfuse_does(host):
    kf = fuse.KhoFuse(host.tree, deny_others=True, owner=1000)
    for opcode in (fuse.READDIR, fuse.FSYNCDIR):
        assert out(kf.handle(*req(opcode, 1, bytes(64), uid=1001)))[0] == errno.ENOSYS


def finalize_then_abort(kf, host, between=lambda: None):
    fin = host.tree.finalize
    fh = open_fh(kf, fin.ino, os.O_WRONLY)[0]
    write(kf, fin.ino, fh, b"1\n")
    between()
    write(kf, fin.ino, fh, b"0\n")


def test_removed_node_lives_while_the_kernel_holds_references(kf, host):
    seen = []
    finalize_then_abort(kf, host, lambda: seen.append(host.tree.resolve("kho/out/fdt")))
    assert seen[0].ino not in host.tree.nodes           # never handed to the kernel
    fdt = []

    def twice():
        fdt.append(host.tree.resolve("kho/out/fdt"))
        lookup(kf, host.tree.out.ino, "fdt")
        lookup(kf, host.tree.out.ino, "fdt")
    finalize_then_abort(kf, host, twice)
    ino = fdt[0].ino
    assert kf.handle(*req(fuse.FORGET, ino, struct.pack("<Q", 1))) is None
    assert ino in host.tree.nodes                       # one reference left
    assert kf.handle(*req(fuse.FORGET, ino, struct.pack("<Q", 1))) is None
    assert ino not in host.tree.nodes


def test_readdirplus_continuation_skips_what_was_removed_meanwhile(kf, host):
    out_dir = host.tree.out
    fin = host.tree.finalize
    fh = open_fh(kf, fin.ino, os.O_WRONLY)[0]
    write(kf, fin.ino, fh, b"1\n")
    dfh = struct.unpack_from("<Q", out(kf.handle(*req(fuse.OPENDIR, out_dir.ino, bytes(8))))[2])[0]

    def names(off, size):
        body = out(kf.handle(*req(fuse.READDIRPLUS, out_dir.ino,
                                  struct.pack("<QQIIQII", dfh, off, size, 0, 0, 0, 0))))[2]
        found, pos = [], 0
        while pos < len(body):
            namelen = struct.unpack_from("<I", body, pos + 144)[0]
            found.append(body[pos + 152:pos + 152 + namelen].decode())
            pos += (152 + namelen + 7) // 8 * 8
        return found
    assert names(0, 320) == [".", ".."]
    write(kf, fin.ino, fh, b"0\n")                      # out/fdt goes
    assert "fdt" not in names(2, 4096)
    assert names(2, 4096) == ["finalize", "scratch_len", "scratch_phys", "sub_fdts"]


def test_invalidate_forgets_removed_entries_their_attributes_and_their_parents():
    calls = []

    class Session:
        def invalidate_entry(self, parent, name):
            calls.append(("entry", parent, name))

        def invalidate_attr(self, ino):
            calls.append(("attr", ino))
    fuse.invalidate(Session(), [(5, "fdt", 9), (6, "memblock", 10), (5, "x", 11), (1, "kho", None)],
                    [1, 5])
    assert calls == [("entry", 5, b"fdt"), ("attr", 9), ("entry", 6, b"memblock"), ("attr", 10),
                     ("entry", 5, b"x"), ("attr", 11), ("entry", 1, b"kho"),
                     ("attr", 5), ("attr", 6), ("attr", 1)]
