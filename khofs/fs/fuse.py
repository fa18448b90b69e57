"""The pyfuse3 file system over the debugfs node tree: one Operations class, errors as FUSEError.

The kernel caches every entry and attribute for TTL seconds: nothing changes them behind its
back except a state change (a write, a control request, a kexec), and every state change is
followed, before the request that made it is answered, by `settle()`, which tells the kernel
what went or changed.
"""

import errno
import functools
import inspect
import os
import sys
import time
import traceback

import pyfuse3
import trio

from .boots import OldBoots
from .debugfs import ROOT_INO, AttrFile, Dir, File, Node, Tree
from .oops import HeldLock, kill_oopsed, task_of
from ..kernel.errors import KernelError
from ..kernel.oops import LockHeld, Oops

TTL = 60.0
NAME_MAX = 255      # debugfs names: simple_lookup() refuses longer ones
CACHE_MODES = ("direct", "page")


def log(text: str) -> None:
    """One line to the daemon's log (its stderr)."""
    print(text, file=sys.stderr, flush=True)


def invalidate(entries, inodes=(), data=()) -> None:
    """Make the kernel forget (parent inode, name, inode or None) entries, the attributes of
    removed inodes (an open file then shows nlink 0), of their parents (whose times the
    removal changed) and of `inodes`, and the cached pages of `data`.
    Blocking: the kernel may first need an answer to a request in flight (a lookup holding
    the directory's lock, a read holding a page), so it runs in a thread beside the loop.
    What the kernel had not cached, or a connection already gone, is fine."""
    def quiet(fn, *args):
        try:
            fn(*args)
        except OSError:
            pass
    parents = []
    for parent, name, ino in entries:
        quiet(pyfuse3.invalidate_entry, parent, os.fsencode(name))
        if ino is not None:
            quiet(pyfuse3.invalidate_inode, ino, True)
            if parent not in parents:
                parents.append(parent)
    for ino in parents + [i for i in inodes if i not in parents]:
        quiet(pyfuse3.invalidate_inode, ino, True)
    for ino in data:
        quiet(pyfuse3.invalidate_inode, ino, False)


def request(opcode: str, nodeid=None, reply=True):
    """A handler: KernelError becomes the kernel's errno; a bug fails only its request (EIO)
    and is logged; with --debug-fuse each request is logged as `OPCODE nodeid N`. A request
    the kernel expects no reply to (reply=False: FORGET) only logs what went wrong: pyfuse3
    would take its exception for the whole loop's."""
    def wrap(fn):
        # Most answers need no await: a plain function saves a coroutine per request.
        is_async = inspect.iscoroutinefunction(fn)

        @functools.wraps(fn)
        async def handler(self, *args):
            if self.debug:
                ino = nodeid(self, args[0]) if nodeid else args[0]
                log(f"khofs: {opcode} nodeid {ino}")
            try:
                if is_async:
                    return await fn(self, *args)
                return fn(self, *args)
            except LockHeld as e:
                try:
                    await self.held_lock.sleep(e, opcode, self.tree.machine.release, log)
                except KernelError as woken:
                    raise pyfuse3.FUSEError(woken.errno) from None
            except (pyfuse3.FUSEError, KernelError) as e:
                if reply:
                    raise e if isinstance(e, pyfuse3.FUSEError) else \
                        pyfuse3.FUSEError(e.errno) from None
                log(f"khofs: {opcode} failed: {e}")
            except Exception:
                log(f"khofs: internal error in {opcode}:\n{traceback.format_exc()}")
                if reply:
                    raise pyfuse3.FUSEError(errno.EIO) from None
        return handler
    return wrap


def refuse(opcode: str, err: int):
    """A handler that answers opcode with err, as debugfs refuses it."""
    @request(opcode)
    def handler(self, *args):
        raise pyfuse3.FUSEError(err)
    return handler


def _file_ino(self, fh):
    h = self.handles.get(fh)
    return h.node.ino if h is not None else 0


def _dir_ino(self, fh):
    h = self.dir_handles.get(fh)
    return h[0].ino if h is not None else 0


class KhoOperations(pyfuse3.Operations):
    """Answers the kernel's requests from the node tree of the current boot.

    cache="direct": every open is direct I/O, so each read asks the tree, and mmap(MAP_SHARED)
    fails with ENODEV as on debugfs. cache="page": read-only opens keep the kernel's page
    cache across opens while the content has not changed (one request per `cat`); mmap then
    works where debugfs refuses it, and a read racing an O_TRUNC write of the same file may
    see it empty or cut short, as the kernel sets its cached size to 0 at that open
    (atomic_o_trunc) and to the written length after the write."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, tree: Tree, stat_size: str = "content", cache: str = "direct",
                 debug: bool = False):
        super().__init__()
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}, not {cache!r}")
        self.tree = tree
        self.stat_size = stat_size
        # A page-cache read relies on st_size: with sizes shown as 0 it would read nothing.
        self.page_cache = cache == "page" and stat_size == "content"
        self.debug = debug
        self.handles: dict[int, object] = {}
        self.dir_handles: dict[int, list] = {}
        self._next_fh = 0
        self._sizes: dict[int, int] = {}      # st_size last told to the kernel, per file
        self._cached: set[int] = set()        # files whose pages the kernel may hold
        self._readers: dict[int, int] = {}    # open page-cache handles per file
        self._page_fhs: dict[int, int] = {}   # page-cache handle -> its file
        # O_APPEND handle -> its file position. debugfs files write at the position (their
        # ->write has no append mode), where FUSE sends an append at the stat size.
        self._append_pos: dict[int, int] = {}
        self.old_boots = OldBoots()
        self._retired: list[tuple] = []       # old boots' entries not yet invalidated
        self._retired_data: set[int] = set()  # old boots' files whose pages the kernel may hold
        self.held_lock = HeldLock(lambda: self.tree.machine.kho_out, trio.Event)

    def new_boot(self, machine) -> None:
        """Serve the tree of a new boot (after a kexec or a reboot). The old boot's entries,
        attributes and pages are invalidated at the next settle()."""
        old = self.tree
        self._retired += self.old_boots.retire(old)
        self._retired_data |= self._cached
        self.tree = Tree(machine, last_ino=old._ino)

    def _node(self, ino: int) -> Node:
        # Removed nodes included: an open file outlives its removal, also by a new boot.
        try:
            return self.tree.get(ino, removed_ok=True)
        except KernelError:
            node = self.old_boots.get(ino)
            if node is None:
                raise
            return node

    def _fh(self) -> int:
        self._next_fh += 1
        return self._next_fh

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.st_mode = node.mode
        a.st_uid, a.st_gid = node.uid, node.gid
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = node.atime, node.mtime, node.ctime
        a.st_blksize = 4096
        a.st_blocks = 0
        a.entry_timeout = a.attr_timeout = TTL
        if isinstance(node, Dir):
            a.st_nlink, a.st_size = (0 if node.gone else node.nlink()), 0
        else:
            a.st_nlink = 0 if node.gone else 1
            a.st_size = node.content_size() if self.stat_size == "content" else 0
            self._sizes[node.ino] = a.st_size
        return a

    # -- state changes ------------------------------------------------------------------
    async def settle(self) -> None:
        """After a state change, before its request is answered: make the kernel forget
        removed files, everything of an old boot (and the root's attributes, whose
        children changed), the attributes of files whose size changed, and, with the page
        cache, what it cached."""
        tree = self.tree
        tree.sync()
        self.held_lock.wake()        # a kexec or a reboot ends the lock an oops left held
        entries = self._retired + tree.take_removed()
        inodes = [ROOT_INO] if self._retired else []
        retired_data, self._retired, self._retired_data = self._retired_data, [], set()
        for ino, size in list(self._sizes.items()):
            node = tree.nodes.get(ino)
            if node is None:
                del self._sizes[ino]
            elif not node.gone and node.content_size() != size:
                inodes.append(ino)
        # Files opened later drop their pages at open; ones open now are told here.
        data = [ino for ino in self._cached if self._readers.get(ino)] + sorted(retired_data)
        self._cached.clear()
        if entries or inodes or data:
            await trio.to_thread.run_sync(invalidate, entries, inodes, data)

    # -- inodes -------------------------------------------------------------------------
    @request("LOOKUP")
    def lookup(self, parent_inode, name, ctx=None):
        """FUSE LOOKUP: the entry name in a directory, as simple_lookup finds it."""
        parent = self.tree.get(parent_inode)
        if len(name) > NAME_MAX:
            raise KernelError(errno.ENAMETOOLONG)       # simple_lookup()
        name = os.fsdecode(name)
        if name == ".":
            node = parent
        elif name == "..":
            node = parent.parent
        else:
            node = self.tree.lookup(parent, name)
        node.nlookup += 1
        return self._attrs(node)

    @request("GETATTR")
    def getattr(self, inode, ctx=None):
        """FUSE GETATTR: a node's attributes, removed nodes included."""
        return self._attrs(self._node(inode))

    @request("SETATTR")
    def setattr(self, inode, attr, fields, fh, ctx):
        """FUSE SETATTR as simple_setattr: mode, owner, times change; a size change does nothing."""
        node = self._node(inode)
        # notify_change() stamps ctime on every attribute change; simple_setattr copies it.
        node.ctime = time.time_ns()
        if fields.update_mode:
            node.mode = (node.mode & ~0o7777) | (attr.st_mode & 0o7777)
        if fields.update_uid:
            node.uid = attr.st_uid
        if fields.update_gid:
            node.gid = attr.st_gid
        if fields.update_atime:
            node.atime = attr.st_atime_ns
        if fields.update_mtime:
            node.mtime = attr.st_mtime_ns
        if fields.update_ctime:
            node.ctime = attr.st_ctime_ns
        return self._attrs(node)

    @request("FORGET", reply=False)
    def forget(self, inode_list):
        """FUSE FORGET: the kernel drops its references to inodes."""
        for ino, nlookup in inode_list:
            if self.old_boots.forget(ino, nlookup):
                self._sizes.pop(ino, None)
                continue
            self.tree.forget(ino, nlookup)
            if ino not in self.tree.nodes:
                self._sizes.pop(ino, None)
                self._cached.discard(ino)

    @request("STATFS")
    def statfs(self, ctx):
        """FUSE STATFS: what statfs(2) shows of debugfs."""
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = NAME_MAX
        return s

    @request("LISTXATTR")
    def listxattr(self, inode, ctx):
        """FUSE LISTXATTR: debugfs inodes have no extended attributes."""
        self._node(inode)
        return []           # debugfs inodes carry no extended attributes

    # -- files --------------------------------------------------------------------------
    @request("OPEN")
    def open(self, inode, flags, ctx):
        """FUSE OPEN: a handle on a file, direct or page-cached per the cache mode."""
        node = self.tree.get(inode)
        if not isinstance(node, File):
            raise KernelError(errno.EISDIR)
        fh = self._fh()
        # An attribute write may oops the kernel, which then kills its task.
        writes = isinstance(node, AttrFile) and flags & os.O_ACCMODE != os.O_RDONLY
        self.handles[fh] = node.open(task_of(ctx)) if writes else node.open()
        if flags & os.O_APPEND:
            self._append_pos[fh] = 0
        if self.page_cache and flags & os.O_ACCMODE == os.O_RDONLY:
            keep = inode in self._cached
            self._cached.add(inode)
            self._readers[inode] = self._readers.get(inode, 0) + 1
            self._page_fhs[fh] = inode
            return pyfuse3.FileInfo(fh=fh, keep_cache=keep, nonseekable=node.nonseekable)
        # Writes go straight to the tree: a written page held locked by the kernel while it
        # waits for the reply could not be invalidated before that reply.
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False,
                                nonseekable=node.nonseekable)

    @request("READ", _file_ino)
    def read(self, fh, off, size):
        """FUSE READ: bytes of the open file at off."""
        return self.handles[fh].read(off, size)

    @request("WRITE", _file_ino)
    async def write(self, fh, off, buf):
        """FUSE WRITE: the write's result, after settling what the state change moved."""
        handle = self.handles[fh]
        try:
            pos = self._append_pos.get(fh)
            n = handle.write(off if pos is None else pos, buf)
            if pos is not None:
                self._append_pos[fh] = pos + n
            return n
        except Oops as e:
            for line in e.lines:
                log(f"kernel: {line}")
            kill_oopsed(e, log)
            raise
        finally:
            await self.settle()

    # No flush(): pyfuse3's ENOSYS makes the kernel stop sending FLUSH, one request less
    # per close. debugfs files have no flush either.

    @request("RELEASE", _file_ino)
    def release(self, fh):
        """FUSE RELEASE: the last close of an open file."""
        self.handles.pop(fh, None)
        self._append_pos.pop(fh, None)
        ino = self._page_fhs.pop(fh, None)
        if ino is not None:
            self._readers[ino] -= 1
            if not self._readers[ino]:
                del self._readers[ino]

    # debugfs file operations have no ->fsync: vfs_fsync() gives EINVAL.
    fsync = refuse("FSYNC", errno.EINVAL)
    # debugfs directories have no ->create; nothing else may be made or moved.
    create = refuse("CREATE", errno.EACCES)
    mkdir = refuse("MKDIR", errno.EPERM)
    mknod = refuse("MKNOD", errno.EPERM)
    symlink = refuse("SYMLINK", errno.EPERM)
    link = refuse("LINK", errno.EPERM)
    unlink = refuse("UNLINK", errno.EPERM)
    rmdir = refuse("RMDIR", errno.EPERM)
    rename = refuse("RENAME", errno.EPERM)

    # -- directories --------------------------------------------------------------------
    @request("OPENDIR")
    def opendir(self, inode, ctx):
        """FUSE OPENDIR: a handle listing the directory as it is now."""
        node = self.tree.get(inode)
        if not isinstance(node, Dir):
            raise KernelError(errno.ENOTDIR)
        fh = self._fh()
        self.dir_handles[fh] = [node, self._dir_entries(node)]
        return fh

    def _dir_entries(self, node):
        return [(".", node), ("..", node.parent)] + [(c.name, c) for c in self.tree.listdir(node)]

    @request("READDIRPLUS", _dir_ino)
    def readdir(self, fh, start_id, token):
        """FUSE READDIR: entries from start_id, as dcache_readdir lists them."""
        handle = self.dir_handles.get(fh)
        if handle is None:
            return
        self.tree.sync()
        if start_id == 0:
            # A stream read from the start (or rewound) lists the live children, as
            # dcache_readdir does; later offsets continue the same listing, past what
            # was removed meanwhile (the kernel would cache a record as a live entry).
            handle[1] = self._dir_entries(handle[0])
        entries = handle[1]
        for i in range(start_id, len(entries)):
            name, node = entries[i]
            if node.gone:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(node), i + 1):
                break
            if i >= 2:
                node.nlookup += 1       # fuse_direntplus_link() takes no reference for . and ..

    @request("RELEASEDIR", _dir_ino)
    def releasedir(self, fh):
        """FUSE RELEASEDIR: the directory handle is closed."""
        self.dir_handles.pop(fh, None)
