"""pyfuse3 Operations over the debugfs node tree."""

import errno
import os
import sys
import time
import traceback

import pyfuse3
import trio

from . import fuseloop
from .debugfs import Dir, File, Node, Tree
from .kernel.errors import KernelError

# The kernel may cache every entry and its attributes: nothing changes them behind its back.
# When a file goes (an abort, a kexec) its entry and attributes are invalidated before the
# request that removed it is answered, so it vanishes the moment the abort completes.
TTL = 60.0


def invalidate(entries) -> None:
    """Make the kernel forget (parent inode, name, inode or None) entries, and the removed
    inodes' attributes (an open file then shows nlink 0). Blocking: call it from a thread,
    as the kernel may first need an answer to a request in flight (a lookup holding the
    directory's lock)."""
    for parent, name, ino in entries:
        try:
            pyfuse3.invalidate_entry(parent, os.fsencode(name))
        except OSError:
            pass            # not cached
        if ino is not None:
            try:
                pyfuse3.invalidate_inode(ino, attr_only=True)
            except OSError:
                pass


async def forget_removed(tree, in_handler: bool = False) -> None:
    tree.sync()
    removed = tree.take_removed()
    if removed:
        if in_handler:
            fuseloop.lend_reader()      # another worker answers the kernel meanwhile
        await trio.to_thread.run_sync(invalidate, removed)


def _fuse_errors(fn):
    async def wrapper(*args, **kw):
        try:
            return fn(*args, **kw)
        except KernelError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except Exception:
            # A bug must not take the mount down: log it and fail this one request.
            print(f"khofs: internal error in {fn.__name__}:\n{traceback.format_exc()}",
                  file=sys.stderr, flush=True)
            raise pyfuse3.FUSEError(errno.EIO) from None
    wrapper.__name__ = fn.__name__
    return wrapper


class KhoOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, tree: Tree, stat_size: str = "content", lock=None):
        super().__init__()
        self.tree = tree
        self.stat_size = stat_size
        self.handles: dict[int, object] = {}
        self.dir_handles: dict[int, list] = {}
        self._next_fh = 0
        self.mount_uid, self.mount_gid = 0, 0

    def set_tree(self, tree: Tree) -> None:
        self.tree = tree

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
            a.st_nlink = node.nlink()
            a.st_size = 0
        else:
            a.st_nlink = 0 if node.gone else 1
            a.st_size = node.content_size() if self.stat_size == "content" else 0
        return a

    @_fuse_errors
    def lookup(self, parent_inode, name, ctx=None):
        parent = self.tree.get(parent_inode)
        name = name.decode("utf-8", "surrogateescape")
        if name == ".":
            node = parent
        elif name == "..":
            node = parent.parent
        else:
            node = self.tree.lookup(parent, name)
        return self._attrs(node)

    @_fuse_errors
    def getattr(self, inode, ctx=None):
        return self._attrs(self.tree.get(inode, removed_ok=True))

    @_fuse_errors
    def setattr(self, inode, attr, fields, fh, ctx):
        # simple_setattr: mode, owner and times change; a size change succeeds and does nothing.
        node = self.tree.get(inode, removed_ok=True)
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

    def forget(self, inode_list):
        for ino, _ in inode_list:
            self.tree.forget(ino)

    @_fuse_errors
    def opendir(self, inode, ctx):
        node = self.tree.get(inode)
        if not isinstance(node, Dir):
            raise KernelError(errno.ENOTDIR)
        fh = self._fh()
        self.dir_handles[fh] = [node, self._dir_entries(node)]
        return fh

    def _dir_entries(self, node):
        return [(".", node), ("..", node.parent)] + [(c.name, c) for c in self.tree.listdir(node)]

    async def readdir(self, fh, start_id, token):
        handle = self.dir_handles.get(fh)
        if handle is None:
            return
        if start_id == 0:
            # A stream read from the start (or rewound) lists the live children, as
            # dcache_readdir does; later offsets continue the same listing.
            self.tree.sync()
            handle[1] = self._dir_entries(handle[0])
        entries = handle[1]
        for i in range(start_id, len(entries)):
            name, node = entries[i]
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(node), i + 1):
                break

    async def releasedir(self, fh):
        self.dir_handles.pop(fh, None)

    @_fuse_errors
    def open(self, inode, flags, ctx):
        node = self.tree.get(inode)
        if not isinstance(node, File):
            raise KernelError(errno.EISDIR)
        fh = self._fh()
        self.handles[fh] = node.open()
        # Content is generated by the kernel model: never serve it from the page cache.
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False,
                                nonseekable=node.nonseekable)

    @_fuse_errors
    def read(self, fh, off, size):
        return self.handles[fh].read(off, size)

    @_fuse_errors
    def _write(self, fh, off, buf):
        return self.handles[fh].write(off, buf)

    async def write(self, fh, off, buf):
        try:
            return await self._write(fh, off, buf)
        finally:
            # An abort removed out/fdt and sub_fdts: answer only once the kernel forgot them.
            await forget_removed(self.tree, in_handler=True)

    # No flush(): pyfuse3's ENOSYS makes the kernel stop sending FLUSH, one request less
    # per close. debugfs files have no flush either.

    async def release(self, fh):
        self.handles.pop(fh, None)

    async def fsync(self, fh, datasync):
        # debugfs file operations have no ->fsync: vfs_fsync() gives EINVAL.
        raise pyfuse3.FUSEError(errno.EINVAL)

    async def create(self, parent_inode, name, mode, flags, ctx):
        # debugfs directories have no ->create.
        raise pyfuse3.FUSEError(errno.EACCES)

    async def mkdir(self, parent_inode, name, mode, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def symlink(self, parent_inode, name, target, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def unlink(self, parent_inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rmdir(self, parent_inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s
