"""The floor of this stack: a bare pyfuse3 + trio file system with one file, "0\\n".

    python bench/floor.py MOUNTPOINT keep_cache|direct_io|no_open

keep_cache: opens keep the page cache (one OPEN per open+read+close, RELEASE after it).
direct_io: every read goes to the daemon. no_open: open answers ENOSYS, so the kernel
sends no OPEN or RELEASE at all and keeps the page cache. Runs until unmounted.
"""

import errno
import os
import stat
import sys

import pyfuse3
import trio

DATA = b"0\n"
INO = pyfuse3.ROOT_INODE + 1


class Floor(pyfuse3.Operations):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode

    def _attr(self, ino):
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        if ino == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFDIR | 0o755, 2, 0
        else:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | 0o644, 1, len(DATA)
        a.entry_timeout = a.attr_timeout = 60
        return a

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name != b"file":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(INO)

    async def open(self, inode, flags, ctx):
        if self.mode == "no_open":
            raise pyfuse3.FUSEError(errno.ENOSYS)
        return pyfuse3.FileInfo(fh=inode, direct_io=self.mode == "direct_io",
                                keep_cache=self.mode == "keep_cache")

    async def read(self, fh, off, size):
        return DATA[off:off + size]


def main():
    mnt, mode = sys.argv[1], sys.argv[2]
    pyfuse3.init(Floor(mode), mnt, set(pyfuse3.default_options) | {"fsname=floor"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
