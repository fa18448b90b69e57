"""The debugfs node tree over the emulated kernel: what `<mnt>/kho/...` shows.

Nodes appear and vanish with kernel state; each node created gets a fresh inode number,
as debugfs's get_next_ino() does. Nothing here knows about FUSE.
"""

import errno
import stat
import time

from ..kernel.errors import KernelError
from ..kernel.kstrtox import kstrtoull
from ..kernel.machine import Machine

SIMPLE_ATTR_BUF = 24          # struct simple_attr get_buf/set_buf size
ROOT_INO = 1


class Node:
    """A debugfs inode: name, mode, times, parent."""
    def __init__(self, tree: "Tree", name: str, mode: int, parent: "Node | None"):
        self.tree = tree
        self.ino = tree.next_ino()
        self.name = name
        self.mode = mode
        self.parent = parent or self
        self.uid = self.gid = 0
        self.atime = self.mtime = self.ctime = time.time_ns()
        self.seq = self.ino          # creation order: readdir lists newest first
        self.gone = False
        self.nlookup = 0             # references the kernel holds (FUSE lookup count)

    def is_dir(self) -> bool:
        """Whether the node is a directory."""
        return stat.S_ISDIR(self.mode)


class Dir(Node):
    """A directory whose children come from kernel state on every look."""
    def __init__(self, tree, name, parent, children_fn, mode=0o755):
        super().__init__(tree, name, stat.S_IFDIR | mode, parent)
        self.children_fn = children_fn

    def children(self) -> list[Node]:
        """The directory's entries now."""
        return self.children_fn()

    def nlink(self) -> int:
        """2 plus one per subdirectory, as on debugfs."""
        return 2 + sum(1 for c in self.children() if c.is_dir())


class Handle:
    """One open file; EIO once its file is removed, as debugfs_file_get() fails."""
    __slots__ = ("node",)

    def __init__(self, node: "File"):
        self.node = node

    def _live(self):
        # debugfs_file_get() fails once the file was removed (e.g. out/fdt after an abort).
        node = self.node
        node.tree.sync()
        if node.gone:
            raise KernelError(errno.EIO, "the file was removed")

    def read(self, off: int, size: int) -> bytes:
        """Bytes at off; EINVAL for a file without a read handler."""
        raise KernelError(errno.EINVAL)

    def write(self, off: int, data: bytes) -> int:
        """Bytes written at off; EINVAL for a file without a write handler."""
        # debugfs's full proxy: no write handler means EINVAL.
        self._live()
        raise KernelError(errno.EINVAL, "this file cannot be written")


class File(Node):
    """A debugfs file; what it reads and writes is its handle's."""
    handle = Handle
    nonseekable = False

    def __init__(self, tree, name, parent, mode):
        super().__init__(tree, name, stat.S_IFREG | mode, parent)

    def content_size(self) -> int:
        """The length a read to EOF returns now."""
        return 0

    def open(self) -> "Handle":
        """A handle for one open(2) of the file."""
        return self.handle(self)


class ShowHandle(Handle):
    """A seq_file-style read of a text made by the kernel."""
    __slots__ = ()

    def read(self, off, size):
        """The text's bytes at off."""
        self._live()
        return self.node.text_fn()[off:off + size]


class ShowFile(File):
    """A seq_file single_open file (scratch_phys, scratch_len)."""
    handle = ShowHandle

    def __init__(self, tree, name, parent, mode, text_fn):
        super().__init__(tree, name, parent, mode)
        self.text_fn = text_fn

    def content_size(self) -> int:
        """The length of the file's text now."""
        return len(self.text_fn())


class AttrHandle(Handle):
    """An open DEFINE_DEBUGFS_ATTRIBUTE file: "%llu\n" out, kstrtoull in."""
    __slots__ = ("get_buf",)

    def __init__(self, node):
        self.node = node
        self.get_buf = b""

    def read(self, off, size):
        """The value as text, read at the open's first read and kept for the rest."""
        self._live()
        if not (off and self.get_buf):
            self.get_buf = (b"%d\n" % self.node.get())[:SIMPLE_ATTR_BUF - 1]
        return self.get_buf[off:off + size]

    def write(self, off, data):
        """Parse the bytes with kstrtoull and set the attribute; its errno if refused."""
        self._live()
        val = kstrtoull(bytes(data[:SIMPLE_ATTR_BUF - 1]), 0)
        self.node.set(val)
        return len(data)


class AttrFile(File):
    """A DEFINE_DEBUGFS_ATTRIBUTE file ("%llu\\n"): simple_attr_read/simple_attr_write."""
    handle = AttrHandle
    nonseekable = True

    def __init__(self, tree, name, parent, mode, get, set_):
        super().__init__(tree, name, parent, mode)
        self.get, self.set = get, set_

    def content_size(self) -> int:
        """The length of the attribute's value as text."""
        return len(b"%d\n" % self.get())


class BlobHandle(Handle):
    """An open debugfs blob: reads and writes go to the memory behind it."""
    __slots__ = ()

    def read(self, off, size):
        """The blob's bytes at off, short at its end."""
        self._live()
        b = self.node.blob
        if off >= b.size:
            return b""
        return self.node.mem.read(b.phys + off, min(size, b.size - off))

    def write(self, off, data):
        """Bytes written into the blob's memory at off (as root may), within its size."""
        self._live()
        b = self.node.blob
        if off >= b.size or not data:
            return 0
        n = min(len(data), b.size - off)
        self.node.mem.write(b.phys + off, data[:n])
        return n


class BlobFile(File):
    """debugfs_create_blob: a fixed-size window onto kernel memory, writable in place."""
    handle = BlobHandle

    def __init__(self, tree, name, parent, blob, mem):
        super().__init__(tree, name, parent, 0o400)
        self.blob, self.mem = blob, mem

    def content_size(self) -> int:
        """The blob's size, as debugfs_create_blob fixed it."""
        return self.blob.size


class Tree:
    """The debugfs root and everything under it, for one boot of the machine."""

    def __init__(self, machine: Machine, last_ino: int = ROOT_INO - 1):
        # Inode numbers keep counting across boots (a kexec) so stale ones never alias.
        self._ino = ROOT_INO - 1
        self.nodes: dict[int, Node] = {}
        self.machine = machine
        self.root = self._add(Dir(self, "", None, self._root_children, mode=0o700))
        self._ino = max(self._ino, last_ino)
        self.kho = self.out = self.out_sub = self.in_ = None
        self.in_children: list[Node] = []
        self.blob_nodes: dict[tuple, BlobFile] = {}
        self._blob_gen = -1
        self._removed: list[tuple] = []
        self._index: dict[int, tuple] = {}
        # Read on every request: whether the blob list changed since the last look.
        self._kho_out = kho_out = machine.kho_out
        if kho_out is None:
            return
        self.kho = self._add(Dir(self, "kho", self.root, self._kho_children))
        self.out = self._add(Dir(self, "out", self.kho, self._out_children))
        self.out_sub = self._add(Dir(self, "sub_fdts", self.out, lambda: self._blob_children("sub_fdts")))
        # 7.4 calls them bootmem_phys and bootmem_len
        phys_name, len_name = machine.profile.scratch_files
        self.scratch_phys = self._add(ShowFile(self, phys_name, self.out, 0o400,
                                               machine.scratch_phys_text))
        self.scratch_len = self._add(ShowFile(self, len_name, self.out, 0o400,
                                              machine.scratch_len_text))
        self.finalize = None
        if machine.profile.has_finalize:
            self.finalize = self._add(AttrFile(self, "finalize", self.out, 0o600,
                                               lambda: int(kho_out.finalized), kho_out.set_finalize))
        kho_in = machine.kho_in
        if kho_in is not None:
            # kho_in_debugfs_init: in/, in/sub_fdts/, in/fdt, then one blob per subtree.
            from ..kernel.fdt import totalsize
            from ..kernel.kho import Blob
            self.in_ = self._add(Dir(self, "in", self.kho, lambda: self.in_children))
            in_sub_children: list[Node] = []
            in_sub = self._add(Dir(self, "sub_fdts", self.in_, lambda: in_sub_children))
            size = totalsize(machine.mem.read(kho_in.fdt_phys, 8))
            in_fdt = self._add(BlobFile(self, "fdt", self.in_, Blob("fdt", kho_in.fdt_phys, size),
                                        machine.mem))
            self.in_children = [in_sub, in_fdt]
            for name, phys, bsize in kho_in.blobs:
                in_sub_children.append(self._add(BlobFile(self, name, in_sub, Blob(name, phys, bsize),
                                                          machine.mem)))

    def next_ino(self) -> int:
        """A fresh inode number, as debugfs's get_next_ino()."""
        self._ino += 1
        return self._ino

    def _add(self, node: Node) -> Node:
        self.nodes[node.ino] = node
        return node

    # -- dynamic children --------------------------------------------------------
    def _root_children(self):
        return [self.kho] if self.kho else []

    def _kho_children(self):
        return [self.out] + ([self.in_] if self.in_ else [])

    def _sync_blobs(self):
        """Create nodes for new kho_out blobs; mark vanished ones gone."""
        self._blob_gen = self._kho_out.generation
        live = {}
        for dirname, blob in self._kho_out.fdt_list:
            key = (dirname, blob.seq)
            node = self.blob_nodes.get(key)
            if node is None:
                parent = self.out if dirname == "out" else self.out_sub
                node = self._add(BlobFile(self, blob.name, parent, blob, self.machine.mem))
            live[key] = node
        for key, node in self.blob_nodes.items():
            if key not in live:
                # simple_recursive_removal(): the file's ctime, its directory's mtime and ctime.
                now = time.time_ns()
                node.gone = True
                node.ctime = node.parent.mtime = node.parent.ctime = now
                self._removed.append((node.parent.ino, node.name, node.ino))
                if not node.nlookup:
                    del self.nodes[node.ino]    # the kernel never had it: nothing will forget it
        self.blob_nodes = live

    def _blob_children(self, dirname):
        self.sync()
        return [n for (d, _), n in self.blob_nodes.items() if d == dirname]

    def _out_children(self):
        fixed = [self.out_sub, self.scratch_phys, self.scratch_len]
        if self.finalize is not None:
            fixed.append(self.finalize)
        return fixed + self._blob_children("out")

    def take_removed(self) -> list:
        """(parent inode, name, inode) of files removed since the last call."""
        out, self._removed = self._removed, []
        return out

    # -- lookups -----------------------------------------------------------------
    def sync(self) -> None:
        """Catch up with kho_out's blob list, if it changed since the last look."""
        kho_out = self._kho_out
        if kho_out is not None and kho_out.generation != self._blob_gen:
            self._sync_blobs()

    def get(self, ino: int, removed_ok: bool = False) -> Node:
        """The node of an inode; a removed one only if removed_ok (an open file outlives
        its removal: fstat still works, with nlink 0)."""
        self.sync()
        node = self.nodes.get(ino)
        if node is None or (node.gone and not removed_ok):
            raise KernelError(errno.ENOENT)
        return node

    def lookup(self, parent: Node, name: str) -> Node:
        """The child name of parent; ENOENT or ENOTDIR as debugfs."""
        if not parent.is_dir():
            raise KernelError(errno.ENOTDIR)
        # Children change only with kho_out's blob list: index each directory per generation.
        self.sync()
        index = self._index.get(parent.ino)
        if index is None or index[0] != self._blob_gen:
            names: dict[str, Node] = {}
            for child in parent.children():
                names.setdefault(child.name, child)
            index = self._index[parent.ino] = (self._blob_gen, names)
        child = index[1].get(name)
        if child is None:
            raise KernelError(errno.ENOENT)
        return child

    def listdir(self, d: Dir) -> list[Node]:
        """Children newest first, as dcache_readdir shows debugfs entries."""
        return sorted(d.children(), key=lambda n: n.seq, reverse=True)

    def resolve(self, path: str) -> Node:
        """The node at a path below the root."""
        node = self.root
        for part in [p for p in path.split("/") if p]:
            node = self.lookup(node, part)
        return node

    def forget(self, ino: int, nlookup: int) -> None:
        """The kernel dropped nlookup references; a removed node goes with the last one."""
        node = self.nodes.get(ino)
        if node is not None:
            node.nlookup = max(0, node.nlookup - nlookup)
            if node.gone and not node.nlookup:
                del self.nodes[ino]
