"""The pyfuse3 adapter's answers, without a mount: attributes, the errno table, open flags,
readdir records and reference counts, and the invalidations a state change sends (from a
thread, before the request that made it returns)."""

import errno
import json
import os
import stat
import threading

import pyfuse3
import pytest
import trio

from khofs.daemon import control
from khofs.fs import fuse
from khofs.daemon.serve import Daemon
from khofs.fs.debugfs import ROOT_INO, Tree
from khofs.fs.fuse import KhoOperations
from khofs.daemon.host import Host
from khofs.kernel.boot import BootArgs


class Kernel:
    """Stands in for the FUSE connection: records invalidations and the threads they ran on."""

    def __init__(self, monkeypatch):
        self.calls, self.threads = [], set()
        monkeypatch.setattr(pyfuse3, "invalidate_entry", self._entry)
        monkeypatch.setattr(pyfuse3, "invalidate_inode", self._inode)

    def _entry(self, parent, name, deleted=0):
        self.threads.add(threading.current_thread())
        self.calls.append(("entry", parent, name))

    def _inode(self, ino, attr_only=False):
        self.threads.add(threading.current_thread())
        self.calls.append(("attr" if attr_only else "data", ino))


@pytest.fixture
def kernel(monkeypatch):
    return Kernel(monkeypatch)


def boot(cmdline="kho=on"):
    return Host.boot(BootArgs(cmdline, memory=1 << 30))


def run(fn, *args):
    return trio.run(fn, *args)


def errno_of(coro_fn, *args):
    with pytest.raises(pyfuse3.FUSEError) as ei:
        run(coro_fn, *args)
    return ei.value.errno


def ino(ops, path):
    return ops.tree.resolve(path).ino


def lookup_path(ops, path):
    node = ROOT_INO
    for part in path.split("/"):
        node = run(ops.lookup, node, part.encode(), None).st_ino
    return node


def open_read(ops, inode, flags=os.O_RDONLY):
    info = run(ops.open, inode, flags, None)
    data, off = b"", 0
    while True:
        chunk = run(ops.read, info.fh, off, 4096)
        if not chunk:
            break
        data, off = data + chunk, off + len(chunk)
    run(ops.release, info.fh)
    return info, data


def write(ops, inode, data):
    info = run(ops.open, inode, os.O_WRONLY | os.O_TRUNC, None)
    try:
        return run(ops.write, info.fh, 0, data)
    finally:
        run(ops.release, info.fh)


def test_lookup_answers_debugfs_attributes_and_counts_references():
    ops = KhoOperations(Tree(boot().machine))
    fin = lookup_path(ops, "kho/out/finalize")
    a = run(ops.getattr, fin, None)
    assert stat.S_IMODE(a.st_mode) == 0o600 and stat.S_ISREG(a.st_mode)
    assert (a.st_nlink, a.st_size, a.st_blksize, a.st_blocks) == (1, 2, 4096, 0)
    assert a.entry_timeout == a.attr_timeout == fuse.TTL == 60
    out = run(ops.getattr, ino(ops, "kho/out"), None)
    assert stat.S_IMODE(out.st_mode) == 0o755 and out.st_nlink == 3       # . .. sub_fdts
    assert ops.tree.nodes[fin].nlookup == 1
    run(ops.lookup, ino(ops, "kho/out"), b"finalize", None)
    assert ops.tree.nodes[fin].nlookup == 2
    run(ops.forget, [(fin, 2)])
    assert ops.tree.nodes[fin].nlookup == 0
    kho = ino(ops, "kho")
    assert run(ops.lookup, kho, b".", None).st_ino == kho
    assert run(ops.lookup, kho, b"..", None).st_ino == ROOT_INO


def test_stat_size_zero_shows_files_empty():
    ops = KhoOperations(Tree(boot().machine), stat_size="zero")
    assert run(ops.getattr, lookup_path(ops, "kho/out/scratch_len"), None).st_size == 0


@pytest.mark.parametrize("name, err", [(b"x" * 256, errno.ENAMETOOLONG), (b"nope", errno.ENOENT),
                                       (b"x" * 255, errno.ENOENT)])
def test_lookup_errors(name, err):
    ops = KhoOperations(Tree(boot().machine))
    assert errno_of(ops.lookup, ino(ops, "kho/out"), name, None) == err


def test_lookup_under_a_file_is_enotdir():
    ops = KhoOperations(Tree(boot().machine))
    assert errno_of(ops.lookup, ino(ops, "kho/out/finalize"), b"x", None) == errno.ENOTDIR


@pytest.mark.parametrize("op, args, err", [
    ("fsync", (1, False), errno.EINVAL),
    ("create", (ROOT_INO, b"x", 0o644, os.O_CREAT, None), errno.EACCES),
    ("mkdir", (ROOT_INO, b"x", 0o755, None), errno.EPERM),
    ("mknod", (ROOT_INO, b"x", 0o644, 0, None), errno.EPERM),
    ("symlink", (ROOT_INO, b"x", b"y", None), errno.EPERM),
    ("link", (2, ROOT_INO, b"x", None), errno.EPERM),
    ("unlink", (ROOT_INO, b"kho", None), errno.EPERM),
    ("rmdir", (ROOT_INO, b"kho", None), errno.EPERM),
    ("rename", (ROOT_INO, b"kho", ROOT_INO, b"x", 0, None), errno.EPERM),
    # Not implemented, as on debugfs: the kernel answers EOPNOTSUPP for these.
    ("setxattr", (2, b"user.x", b"1", None), errno.ENOSYS),
    ("getxattr", (2, b"user.x", None), errno.ENOSYS),
    ("flush", (1,), errno.ENOSYS),
])
def test_refused_operations(op, args, err):
    ops = KhoOperations(Tree(boot().machine))
    assert errno_of(getattr(ops, op), *args) == err


def test_listxattr_is_empty():
    ops = KhoOperations(Tree(boot().machine))
    assert run(ops.listxattr, ino(ops, "kho/out/finalize"), None) == []


def test_statfs():
    s = run(KhoOperations(Tree(boot().machine)).statfs, None)
    assert (s.f_bsize, s.f_frsize, s.f_namemax, s.f_blocks, s.f_files) == (4096, 4096, 255, 0, 0)


def test_setattr_changes_mode_owner_times_and_stamps_ctime():
    ops = KhoOperations(Tree(boot().machine))
    fin = ino(ops, "kho/out/finalize")
    before = ops.tree.nodes[fin].ctime
    attr = pyfuse3.EntryAttributes()
    attr.st_mode, attr.st_uid, attr.st_mtime_ns = 0o644, 7, 10**9
    # SetattrFields is read-only from Python: a plain object stands in with the same names.
    fields = type("Fields", (), dict(update_mode=True, update_uid=True, update_gid=False,
                                     update_atime=False, update_mtime=True, update_ctime=False,
                                     update_size=True))()
    a = run(ops.setattr, fin, attr, fields, None, None)
    assert stat.S_IMODE(a.st_mode) == 0o644 and stat.S_ISREG(a.st_mode)
    assert (a.st_uid, a.st_gid, a.st_mtime_ns, a.st_size) == (7, 0, 10**9, 2)
    assert a.st_ctime_ns >= before


def test_open_flags_direct():
    ops = KhoOperations(Tree(boot().machine))
    fin = run(ops.open, ino(ops, "kho/out/finalize"), os.O_RDONLY, None)
    assert (fin.direct_io, fin.keep_cache, fin.nonseekable) == (True, False, True)
    sl = run(ops.open, ino(ops, "kho/out/scratch_len"), os.O_RDONLY, None)
    assert (sl.direct_io, sl.keep_cache, sl.nonseekable) == (True, False, False)
    assert errno_of(ops.open, ino(ops, "kho/out"), os.O_RDONLY, None) == errno.EISDIR
    assert errno_of(ops.opendir, ino(ops, "kho/out/finalize"), None) == errno.ENOTDIR


def test_page_cache_is_kept_only_while_the_content_is_unchanged(kernel):
    ops = KhoOperations(Tree(boot().machine), cache="page")
    fin = ino(ops, "kho/out/finalize")
    first, text = open_read(ops, fin)
    assert (first.direct_io, first.keep_cache, text) == (False, False, b"0\n")
    again, _ = open_read(ops, fin)
    assert again.keep_cache is True                 # nothing changed: the pages stand
    reader = run(ops.open, fin, os.O_RDONLY, None)  # open across the change
    w = run(ops.open, fin, os.O_WRONLY, None)
    assert (w.direct_io, w.keep_cache) == (True, False)
    assert run(ops.write, w.fh, 0, b"1") == 1
    # The open reader's pages were dropped before the write returned, from a thread.
    assert ("data", fin) in kernel.calls
    assert threading.main_thread() not in kernel.threads
    after, text = open_read(ops, fin)
    assert (after.keep_cache, text) == (False, b"1\n")
    run(ops.release, reader.fh)
    run(ops.release, w.fh)
    assert ops._readers == {}


def test_page_cache_needs_content_sizes():
    ops = KhoOperations(Tree(boot().machine), stat_size="zero", cache="page")
    assert run(ops.open, ino(ops, "kho/out/finalize"), os.O_RDONLY, None).direct_io is True


def test_unknown_cache_mode():
    with pytest.raises(ValueError):
        KhoOperations(Tree(boot().machine), cache="both")


def test_abort_invalidates_removed_files_before_the_write_returns(kernel):
    ops = KhoOperations(Tree(boot("kho=on reserve_mem=1M:4096:oops").machine))
    out, fin = ino(ops, "kho/out"), ino(ops, "kho/out/finalize")
    assert write(ops, fin, b"1") == 1
    assert kernel.calls == []                       # files only appeared
    fdt = lookup_path(ops, "kho/out/fdt")
    sub = ino(ops, "kho/out/sub_fdts")
    mb = lookup_path(ops, "kho/out/sub_fdts/memblock")
    assert write(ops, fin, b"0") == 1
    calls = kernel.calls
    assert ("entry", out, b"fdt") in calls and ("entry", sub, b"memblock") in calls
    assert ("attr", fdt) in calls and ("attr", mb) in calls
    assert ("attr", out) in calls and ("attr", sub) in calls      # their times changed
    assert threading.main_thread() not in kernel.threads
    # The removed file still answers getattr (nlink 0) until the kernel forgets it.
    assert run(ops.getattr, fdt, None).st_nlink == 0
    run(ops.forget, [(fdt, 1)])
    assert fdt not in ops.tree.nodes


def test_failed_write_still_settles_and_keeps_errno(kernel):
    ops = KhoOperations(Tree(boot().machine))
    fin = ino(ops, "kho/out/finalize")
    info = run(ops.open, fin, os.O_WRONLY, None)
    assert errno_of(ops.write, info.fh, 0, b"x") == errno.EINVAL
    assert errno_of(ops.write, info.fh, 0, b"0") == errno.ENOENT    # 6.18: not finalized
    assert kernel.calls == []


def test_readdir_lists_dots_then_newest_first_and_counts_references(monkeypatch):
    ops = KhoOperations(Tree(boot().machine))
    got = []
    room = [99]

    def reply(token, name, attr, next_id):
        if len(got) >= room[0]:
            return False
        got.append((name, attr.st_ino, next_id))
        return True
    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    out = ino(ops, "kho/out")
    fh = run(ops.opendir, out, None)
    room[0] = 3
    run(ops.readdir, fh, 0, None)
    assert [n for n, _, _ in got] == [b".", b"..", b"finalize"]
    room[0] = 99
    run(ops.readdir, fh, got[-1][2], None)
    names = [n for n, _, _ in got]
    assert names == [b".", b"..", b"finalize", b"scratch_len", b"scratch_phys", b"sub_fdts"]
    assert [i for _, _, i in got] == [1, 2, 3, 4, 5, 6]
    assert ops.tree.nodes[out].nlookup == 0           # . took no reference
    assert all(ops.tree.nodes[i].nlookup == 1 for _, i, _ in got[2:])
    run(ops.releasedir, fh)


def test_readdir_continues_past_files_removed_meanwhile(monkeypatch):
    ops = KhoOperations(Tree(boot().machine))
    got = []
    monkeypatch.setattr(pyfuse3, "readdir_reply",
                        lambda token, name, attr, next_id: got.append(name) or len(got) < 3)
    monkeypatch.setattr(pyfuse3, "invalidate_entry", lambda *a: None)
    monkeypatch.setattr(pyfuse3, "invalidate_inode", lambda *a: None)
    write(ops, ino(ops, "kho/out/finalize"), b"1")
    fh = run(ops.opendir, ino(ops, "kho/out"), None)
    run(ops.readdir, fh, 0, None)
    assert got == [b".", b"..", b"fdt"]
    write(ops, ino(ops, "kho/out/finalize"), b"0")
    got.clear()
    run(ops.readdir, fh, 2, None)                     # the fdt record was not taken
    assert got == [b"finalize", b"scratch_len", b"scratch_phys"]


def test_a_bug_fails_only_its_request_with_eio(capsys, monkeypatch):
    ops = KhoOperations(Tree(boot().machine))
    monkeypatch.setattr(ops.tree, "get", lambda *a, **k: 1 / 0)
    assert errno_of(ops.getattr, ROOT_INO, None) == errno.EIO
    assert "internal error in GETATTR" in capsys.readouterr().err


def test_debug_logs_each_request(capsys):
    ops = KhoOperations(Tree(boot().machine), debug=True)
    info = run(ops.open, ino(ops, "kho/out/finalize"), os.O_RDONLY, None)
    run(ops.read, info.fh, 0, 10)
    err = capsys.readouterr().err
    fin = ino(ops, "kho/out/finalize")
    assert f"OPEN nodeid {fin}\n" in err and f"READ nodeid {fin}\n" in err


# -- the daemon's control path -------------------------------------------------------------
def daemon(tmp_path):
    return Daemon(str(tmp_path), boot())


def request(d, **req):
    return run(d.control_request, json.dumps(req).encode())


def test_kexec_makes_the_kernel_forget_the_old_boot_before_the_reply(kernel, tmp_path):
    d = daemon(tmp_path)
    assert_old_boot_forgotten(kernel, d, "kexec")


@pytest.mark.parametrize("cmd", ["kexec", "reboot"])
def test_a_new_boot_makes_the_kernel_forget_the_old_one_before_the_reply(kernel, tmp_path, cmd):
    assert_old_boot_forgotten(kernel, daemon(tmp_path), cmd)


def assert_old_boot_forgotten(kernel, d, cmd):
    old = d.ops.tree
    old_ino = {n: old.resolve(n).ino for n in ("kho", "kho/out", "kho/out/sub_fdts",
                                               "kho/out/scratch_phys", "kho/out/scratch_len",
                                               "kho/out/finalize")}
    machine = d.host.machine
    assert request(d, cmd=cmd)["ok"]
    calls = kernel.calls
    entries = [c for c in calls if c[0] == "entry"]
    # Every entry of the old boot, and the attributes of its inodes (an open file then shows
    # nlink 0) and of the root (its link count).
    assert sorted(entries) == sorted(("entry", old.resolve(n.rpartition("/")[0]).ino,
                                      n.rpartition("/")[2].encode()) for n in old_ino)
    assert {c for c in calls if c[0] != "entry"} == \
        {("attr", i) for i in old_ino.values()} | {("attr", ROOT_INO)}
    assert threading.main_thread() not in kernel.threads
    assert d.host.machine is not machine
    assert d.ops.tree is not old and d.ops.tree.machine is d.host.machine
    assert all(node.gone for node in old.nodes.values())
    # New inode numbers: the kernel can never take a new file for an old one.
    assert min(n.ino for n in d.ops.tree.nodes.values() if n is not d.ops.tree.root) \
        > max(old_ino.values())


def test_a_request_as_the_daemon_stops_is_refused_and_changes_nothing(kernel, tmp_path):
    d = daemon(tmp_path)
    d.stopping = True
    r = request(d, cmd="mem_alloc", size=4096)
    assert r["ok"] is False and r["errno"] == errno.ESHUTDOWN and r["error"] == "ESHUTDOWN"
    assert d.control.user_allocs == {}
    assert kernel.calls == []


def test_a_failing_request_gets_eio_and_the_next_is_served(kernel, tmp_path, monkeypatch):
    d = daemon(tmp_path)
    monkeypatch.setitem(control.COMMANDS, "status", (lambda self, req: 1 / 0, set(), set()))
    r = request(d, cmd="status")
    assert r["ok"] is False and r["errno"] == errno.EIO
    assert request(d, cmd="log")["ok"] is True


def test_forget_shares_the_error_handling_and_never_raises(monkeypatch, capsys):
    # FORGET has no reply: an exception would escape into pyfuse3's loop and end the daemon.
    ops = KhoOperations(Tree(boot().machine))
    fin = lookup_path(ops, "kho/out/finalize")

    def broken(ino, nlookup):
        raise RuntimeError("bug in forget")
    monkeypatch.setattr(ops.tree, "forget", broken)
    assert run(ops.forget, [(fin, 1)]) is None
    assert "internal error in FORGET" in capsys.readouterr().err
    monkeypatch.setattr(ops.tree, "forget", lambda ino, n: (_ for _ in ()).throw(
        pyfuse3.FUSEError(errno.ENOENT)))
    assert run(ops.forget, [(fin, 1)]) is None
    assert "FORGET failed" in capsys.readouterr().err
