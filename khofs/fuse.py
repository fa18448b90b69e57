"""The FUSE requests over the debugfs node tree: request bytes in, reply bytes out.

libfuse (khofs.libfuse) mounts, answers INIT and sends invalidations; every request after
INIT is read from /dev/fuse and answered here (khofs.fuseloop). A Python binding's own
per-request path (pyfuse3's splice reads, a coroutine and a trio round trip per request)
cost several times what the answer itself does. The replies are the bytes libfuse sends
for the same answers (errnos, timeouts, open flags, readdirplus records).
"""

import errno
import os
import struct
import sys
import time
import traceback

from .debugfs import Dir, File, Node, Tree
from .kernel.errors import KernelError

# The kernel may cache every entry and its attributes: nothing changes them behind its back.
# When a file goes (an abort, a kexec) its entry and attributes are invalidated before the
# request that removed it is answered, so it vanishes the moment the abort completes.
TTL = 60

# include/uapi/linux/fuse.h
LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
READLINK, SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK = 5, 6, 8, 9, 10, 11, 12, 13
OPEN, READ, WRITE, STATFS, RELEASE, FSYNC = 14, 15, 16, 17, 18, 20
FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR, FSYNCDIR = 25, 26, 27, 28, 29, 30
CREATE, INTERRUPT, DESTROY, NOTIFY_REPLY, BATCH_FORGET = 35, 36, 38, 41, 42
READDIRPLUS, RENAME2 = 44, 45
OPCODE_NAMES = {v: k for k, v in (
    ("LOOKUP", LOOKUP), ("FORGET", FORGET), ("GETATTR", GETATTR), ("SETATTR", SETATTR),
    ("READLINK", READLINK), ("SYMLINK", SYMLINK), ("MKNOD", MKNOD), ("MKDIR", MKDIR),
    ("UNLINK", UNLINK), ("RMDIR", RMDIR), ("RENAME", RENAME), ("LINK", LINK), ("OPEN", OPEN),
    ("READ", READ), ("WRITE", WRITE), ("STATFS", STATFS), ("RELEASE", RELEASE),
    ("FSYNC", FSYNC), ("FLUSH", FLUSH), ("INIT", INIT), ("OPENDIR", OPENDIR),
    ("READDIR", READDIR), ("RELEASEDIR", RELEASEDIR), ("FSYNCDIR", FSYNCDIR),
    ("CREATE", CREATE), ("INTERRUPT", INTERRUPT), ("DESTROY", DESTROY),
    ("NOTIFY_REPLY", NOTIFY_REPLY), ("BATCH_FORGET", BATCH_FORGET),
    ("READDIRPLUS", READDIRPLUS), ("RENAME2", RENAME2))}

FATTR_MODE, FATTR_UID, FATTR_GID = 1 << 0, 1 << 1, 1 << 2
FATTR_ATIME, FATTR_MTIME, FATTR_ATIME_NOW, FATTR_MTIME_NOW = 1 << 4, 1 << 5, 1 << 7, 1 << 8
FATTR_CTIME = 1 << 10
FOPEN_DIRECT_IO, FOPEN_NONSEEKABLE = 1 << 0, 1 << 2

IN_HEADER = struct.Struct("<IIQQIIIHH")        # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")             # len error unique
ATTR = struct.Struct("<QQQqqqIIIIIIIIII")      # fuse_attr
ENTRY_OUT = struct.Struct("<QQQQII")           # before the fuse_attr
ATTR_OUT = struct.Struct("<QII")
OPEN_REPLY = struct.Struct("<IiQQIi")            # fuse_out_header + fuse_open_out
READ_IN = struct.Struct("<QQI")                # fh offset size (also fuse_write_in's start)
WRITE_IN_SIZE = 40
WRITE_OUT = struct.Struct("<II")
RELEASE_IN = struct.Struct("<Q")
SETATTR_IN = struct.Struct("<IIQQQqqqIIIIIIII")
DIRENT = struct.Struct("<QQII")
FORGET_ONE = struct.Struct("<QQ")
KSTATFS = struct.Struct("<QQQQQIII4x24x")
HDR = IN_HEADER.size
_IN_HOT = struct.Struct("<4xIQQI")               # opcode unique nodeid uid

# Requests -o allow_root still lets through from other users, as libfuse does.
_OPEN_TO_OTHERS = frozenset({INIT, READ, WRITE, FSYNC, RELEASE, READDIR, FSYNCDIR,
                             RELEASEDIR, NOTIFY_REPLY, READDIRPLUS})

NAME_MAX = 255      # debugfs names: simple_lookup() refuses longer ones


def invalidate(session, entries, inodes=()) -> None:
    """Make the kernel forget (parent inode, name, inode or None) entries, and the
    attributes of the removed inodes (an open file then shows nlink 0), of their parents
    (whose times the removal changed) and of `inodes`.
    Blocking: call it from a thread, as the kernel may first need an answer to a request
    in flight (a lookup holding the directory's lock). Entries it had not cached are fine."""
    parents = []
    for parent, name, ino in entries:
        session.invalidate_entry(parent, os.fsencode(name))
        if ino is not None:
            session.invalidate_attr(ino)
            if parent not in parents:
                parents.append(parent)
    for ino in parents + [i for i in inodes if i not in parents]:
        session.invalidate_attr(ino)


def _error(unique: int, err: int) -> bytes:
    return OUT_HEADER.pack(16, -err, unique)


def _ok(unique: int, payload: bytes = b"") -> bytes:
    return OUT_HEADER.pack(16 + len(payload), 0, unique) + payload


def _cstring(buf, start: int, end: int) -> bytes:
    nul = buf.find(b"\0", start, end)
    return bytes(buf[start:nul if nul >= 0 else end])


class KhoFuse:
    """Answers one request at a time. handle() returns the reply, or None when there is none
    (FORGET, INTERRUPT) or it is sent later (a write that removed files: see `deferred`)."""

    def __init__(self, tree: Tree, stat_size: str = "content", deny_others: bool = False,
                 owner: int = 0):
        self.tree = tree
        self.stat_size = stat_size
        self.deny_others, self.owner = deny_others, owner
        self.handles: dict[int, object] = {}
        self.dir_handles: dict[int, list] = {}
        self._next_fh = 0
        # (unique, reply, removed entries): sent once the kernel forgot the entries.
        self.deferred: list[tuple] = []
        self._opened = None         # (unique, fh) of the last open, until it is answered
        self._ops = {
            LOOKUP: self.lookup, GETATTR: self.getattr, SETATTR: self.setattr,
            OPEN: self.open, READ: self.read, WRITE: self.write, RELEASE: self.release,
            OPENDIR: self.opendir, READDIRPLUS: self.readdirplus, RELEASEDIR: self.releasedir,
            STATFS: self.statfs,
            # debugfs file operations have no ->fsync: vfs_fsync() gives EINVAL.
            FSYNC: lambda *a: _error(a[0], errno.EINVAL),
            # debugfs directories have no ->create; nothing else may be made or moved.
            CREATE: lambda *a: _error(a[0], errno.EACCES),
            **{op: (lambda *a: _error(a[0], errno.EPERM))
               for op in (SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME, RENAME2, LINK)},
        }

    def set_tree(self, tree: Tree) -> None:
        self.tree = tree

    # -- dispatch -----------------------------------------------------------------
    def handle(self, buf, n: int):
        opcode, unique, nodeid, uid = _IN_HOT.unpack_from(buf)
        op = self._ops.get(opcode)
        if op is None:
            return self._special(opcode, unique, nodeid, uid, buf)
        if self.deny_others and opcode not in _OPEN_TO_OTHERS and self._denied(uid):
            return _error(unique, errno.EACCES)
        try:
            return op(unique, nodeid, buf, n)
        except KernelError as e:
            return _error(unique, e.errno)
        except Exception:
            # A bug must not take the mount down: log it and fail this one request.
            print(f"khofs: internal error in opcode {opcode}:\n{traceback.format_exc()}",
                  file=sys.stderr, flush=True)
            return _error(unique, errno.EIO)

    def _denied(self, uid: int) -> bool:
        """-o allow_root: requests from users other than the owner and root are refused."""
        return self.deny_others and uid != self.owner and uid != 0

    def _special(self, opcode, unique, nodeid, uid, buf):
        if opcode == FORGET:
            self.tree.forget(nodeid, struct.unpack_from("<Q", buf, HDR)[0])
        elif opcode == BATCH_FORGET:
            count = struct.unpack_from("<I", buf, HDR)[0]
            for i in range(count):
                self.tree.forget(*FORGET_ONE.unpack_from(buf, HDR + 8 + 16 * i))
        elif opcode == DESTROY:
            return _ok(unique)
        elif opcode not in (INTERRUPT, NOTIFY_REPLY):
            # What libfuse answers without a handler (allow_root lets READDIR and FSYNCDIR by).
            denied = opcode not in _OPEN_TO_OTHERS and self._denied(uid)
            return _error(unique, errno.EACCES if denied else errno.ENOSYS)
        # FORGET, INTERRUPT, NOTIFY_REPLY: the kernel neither waits for a reply nor takes one.
        return None

    def dropped(self, unique: int) -> None:
        """The kernel refused the reply to `unique` (the request was interrupted): an
        interrupted open must not leave its handle behind; libfuse releases it too."""
        if self._opened is not None and self._opened[0] == unique:
            self.handles.pop(self._opened[1], None)
            self.dir_handles.pop(self._opened[1], None)

    # -- attributes ---------------------------------------------------------------
    def _attr(self, node: Node) -> bytes:
        if isinstance(node, Dir):
            nlink, size = node.nlink(), 0
        else:
            nlink = 0 if node.gone else 1
            size = node.content_size() if self.stat_size == "content" else 0
        a, m, c = node.atime, node.mtime, node.ctime
        return ATTR.pack(node.ino, size, 0, a // 10**9, m // 10**9, c // 10**9,
                         a % 10**9, m % 10**9, c % 10**9, node.mode, nlink,
                         node.uid, node.gid, 0, 4096, 0)

    def _entry(self, node: Node) -> bytes:
        return ENTRY_OUT.pack(node.ino, 0, TTL, TTL, 0, 0) + self._attr(node)

    # -- inodes -------------------------------------------------------------------
    def lookup(self, unique, nodeid, buf, n):
        parent = self.tree.get(nodeid)
        raw = _cstring(buf, HDR, n)
        if len(raw) > NAME_MAX:
            raise KernelError(errno.ENAMETOOLONG)       # simple_lookup()
        name = raw.decode("utf-8", "surrogateescape")
        if name == ".":
            node = parent
        elif name == "..":
            node = parent.parent
        else:
            node = self.tree.lookup(parent, name)
        node.nlookup += 1
        return _ok(unique, self._entry(node))

    def getattr(self, unique, nodeid, buf, n):
        node = self.tree.get(nodeid, removed_ok=True)
        return _ok(unique, ATTR_OUT.pack(TTL, 0, 0) + self._attr(node))

    def setattr(self, unique, nodeid, buf, n):
        # simple_setattr: mode, owner and times change; a size change succeeds and does nothing.
        (valid, _, _fh, _size, _lo, atime, mtime, ctime, atimensec, mtimensec, ctimensec,
         mode, _, uid, gid, _) = SETATTR_IN.unpack_from(buf, HDR)
        node = self.tree.get(nodeid, removed_ok=True)
        now = time.time_ns()
        # notify_change() stamps ctime on every attribute change; simple_setattr copies it.
        node.ctime = now
        if valid & FATTR_MODE:
            node.mode = (node.mode & ~0o7777) | (mode & 0o7777)
        if valid & FATTR_UID:
            node.uid = uid
        if valid & FATTR_GID:
            node.gid = gid
        if valid & FATTR_ATIME:
            node.atime = atime * 10**9 + atimensec
        elif valid & FATTR_ATIME_NOW:
            node.atime = now
        if valid & FATTR_MTIME:
            node.mtime = mtime * 10**9 + mtimensec
        elif valid & FATTR_MTIME_NOW:
            node.mtime = now
        if valid & FATTR_CTIME:
            node.ctime = ctime * 10**9 + ctimensec
        return _ok(unique, ATTR_OUT.pack(TTL, 0, 0) + self._attr(node))

    def statfs(self, unique, nodeid, buf, n):
        return _ok(unique, KSTATFS.pack(0, 0, 0, 0, 0, 4096, NAME_MAX, 4096))

    # -- files ----------------------------------------------------------------------
    def _fh(self) -> int:
        self._next_fh += 1
        return self._next_fh

    def open(self, unique, nodeid, buf, n):
        node = self.tree.get(nodeid)
        if not isinstance(node, File):
            raise KernelError(errno.EISDIR)
        fh = self._fh()
        self.handles[fh] = node.open()
        self._opened = (unique, fh)
        # Content is generated by the kernel model: never serve it from the page cache.
        flags = FOPEN_DIRECT_IO | (FOPEN_NONSEEKABLE if node.nonseekable else 0)
        return OPEN_REPLY.pack(OPEN_REPLY.size, 0, unique, fh, flags, 0)

    def read(self, unique, nodeid, buf, n):
        fh, off, size = READ_IN.unpack_from(buf, HDR)
        data = self.handles[fh].read(off, size)
        return OUT_HEADER.pack(16 + len(data), 0, unique) + data

    def write(self, unique, nodeid, buf, n):
        fh, off, size = READ_IN.unpack_from(buf, HDR)
        start = HDR + WRITE_IN_SIZE
        try:
            written = self.handles[fh].write(off, bytes(buf[start:start + size]))
            reply = _ok(unique, WRITE_OUT.pack(written, 0))
        except KernelError as e:
            reply = _error(unique, e.errno)
        finally:
            # An abort removed out/fdt and sub_fdts: answer only once the kernel forgot them.
            self.tree.sync()
            removed = self.tree.take_removed()
        if removed:
            self.deferred.append((unique, reply, removed))
            return None
        return reply

    def release(self, unique, nodeid, buf, n):
        self.handles.pop(RELEASE_IN.unpack_from(buf, HDR)[0], None)
        return OUT_HEADER.pack(16, 0, unique)

    # -- directories ----------------------------------------------------------------
    def opendir(self, unique, nodeid, buf, n):
        node = self.tree.get(nodeid)
        if not isinstance(node, Dir):
            raise KernelError(errno.ENOTDIR)
        fh = self._fh()
        self.dir_handles[fh] = [node, self._dir_entries(node)]
        self._opened = (unique, fh)
        return OPEN_REPLY.pack(OPEN_REPLY.size, 0, unique, fh, 0, 0)

    def _dir_entries(self, node):
        return [(".", node), ("..", node.parent)] + [(c.name, c) for c in self.tree.listdir(node)]

    def readdirplus(self, unique, nodeid, buf, n):
        fh, start, size = READ_IN.unpack_from(buf, HDR)
        handle = self.dir_handles.get(fh)
        if handle is None:
            return _ok(unique)
        self.tree.sync()
        if start == 0:
            # A stream read from the start (or rewound) lists the live children, as
            # dcache_readdir does; later offsets continue the same listing, past what
            # was removed meanwhile (the kernel would cache a record as a live entry).
            handle[1] = self._dir_entries(handle[0])
        out, used = [], 0
        entries = handle[1]
        for i in range(start, len(entries)):
            name, node = entries[i]
            if node.gone:
                continue
            raw = os.fsencode(name)
            rec = (self._entry(node) + DIRENT.pack(node.ino, i + 1, len(raw), (node.mode >> 12) & 0o17)
                   + raw)
            rec += b"\0" * (-len(rec) % 8)
            if used + len(rec) > size:
                break
            out.append(rec)
            used += len(rec)
            if i >= 2:
                node.nlookup += 1       # fuse_direntplus_link() takes no reference for . and ..
        return _ok(unique, b"".join(out))

    def releasedir(self, unique, nodeid, buf, n):
        self.dir_handles.pop(RELEASE_IN.unpack_from(buf, HDR)[0], None)
        return _ok(unique)
