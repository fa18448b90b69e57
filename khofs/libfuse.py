"""libfuse's low-level session, through ctypes: libfuse mounts (mount(2), or fusermount3 for
other users), negotiates INIT, sends invalidations and unmounts. Every request after INIT
is read from the session's fd and answered by khofs (khofs.fuseloop).

Nothing here imports an event loop, so a daemon is ready as soon as the mount is.
"""

import ctypes
import errno
import os
import threading

# include/fuse_common.h (FUSE_CAP_*): what the filesystem asks of the kernel at INIT.
CAP_EXPORT_SUPPORT = 1 << 4
CAP_READDIRPLUS = 1 << 13
CAP_READDIRPLUS_AUTO = 1 << 14

# The kernel refuses a read into less than a whole request; libfuse's own buffer size.
BUFSIZE = 256 * 4096 + 4096


def negotiate(capable: int, want: int) -> int:
    """The capabilities to ask for, given libfuse's defaults `want`: every listing is a
    READDIRPLUS (entries come with their attributes, so `ls -l` costs no LOOKUPs), and
    LOOKUP of "." and ".." is answered."""
    want |= capable & (CAP_READDIRPLUS | CAP_EXPORT_SUPPORT)
    return want & ~CAP_READDIRPLUS_AUTO


class _ConnInfo(ctypes.Structure):
    # The leading fields of struct fuse_conn_info; libfuse owns the rest.
    _fields_ = [("proto_major", ctypes.c_uint), ("proto_minor", ctypes.c_uint),
                ("max_write", ctypes.c_uint), ("max_read", ctypes.c_uint),
                ("max_readahead", ctypes.c_uint), ("capable", ctypes.c_uint),
                ("want", ctypes.c_uint)]


_INIT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(_ConnInfo))


class _Ops(ctypes.Structure):
    # Only ->init, the first member of struct fuse_lowlevel_ops: libfuse copies op_size
    # bytes and leaves the other operations NULL.
    _fields_ = [("init", _INIT)]


class _Args(ctypes.Structure):
    _fields_ = [("argc", ctypes.c_int), ("argv", ctypes.POINTER(ctypes.c_char_p)),
                ("allocated", ctypes.c_int)]


class _Buf(ctypes.Structure):
    # struct fuse_buf; the spare words stay zero should a later libfuse read more fields.
    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p),
                ("fd", ctypes.c_int), ("pos", ctypes.c_int64), ("spare", ctypes.c_uint64 * 4)]


_lib = None


def _libfuse():
    global _lib
    if _lib is None:
        lib = ctypes.CDLL("libfuse3.so.3")     # CDLL drops the GIL around each call
        vp, u64 = ctypes.c_void_p, ctypes.c_uint64
        lib.fuse_session_new.restype = vp
        lib.fuse_session_new.argtypes = [ctypes.POINTER(_Args), ctypes.POINTER(_Ops),
                                         ctypes.c_size_t, vp]
        lib.fuse_session_mount.argtypes = [vp, ctypes.c_char_p]
        lib.fuse_session_fd.argtypes = [vp]
        lib.fuse_session_process_buf.restype = None
        lib.fuse_session_process_buf.argtypes = [vp, ctypes.POINTER(_Buf)]
        lib.fuse_lowlevel_notify_inval_entry.argtypes = [vp, u64, ctypes.c_char_p,
                                                         ctypes.c_size_t]
        lib.fuse_lowlevel_notify_inval_inode.argtypes = [vp, u64, ctypes.c_int64,
                                                         ctypes.c_int64]
        lib.fuse_session_unmount.restype = None
        lib.fuse_session_unmount.argtypes = [vp]
        lib.fuse_session_destroy.restype = None
        lib.fuse_session_destroy.argtypes = [vp]
        _lib = lib
    return _lib


@_INIT
def _init(userdata, conn):
    conn.contents.want = negotiate(conn.contents.capable, conn.contents.want)


class Session:
    """One mount. `fd` is the /dev/fuse connection; call init() once to answer INIT."""

    def __init__(self, mountpoint: str, options):
        lib = _libfuse()
        argv = [b"khofs"]
        for opt in options:
            argv += [b"-o", opt.encode("ascii")]
        self._argv = (ctypes.c_char_p * len(argv))(*argv)
        args = _Args(len(argv), self._argv, 0)
        self._ops = _Ops(_init)
        self._se = lib.fuse_session_new(ctypes.byref(args), ctypes.byref(self._ops),
                                        ctypes.sizeof(self._ops), None)
        if not self._se:
            raise RuntimeError("fuse_session_new() failed (libfuse's reason is in the log)")
        if lib.fuse_session_mount(self._se, os.fsencode(mountpoint)) != 0:
            lib.fuse_session_destroy(self._se)
            self._se = None
            raise RuntimeError("fuse_session_mount failed (libfuse's reason is in the log)")
        self.fd = lib.fuse_session_fd(self._se)
        self._lock = threading.Lock()
        self._busy = 0              # invalidations in flight, in other threads
        self._closed = False

    def init(self) -> None:
        """Read the kernel's INIT and let libfuse answer it (the connection's parameters,
        which libfuse keeps for the invalidations it sends later)."""
        buf = ctypes.create_string_buffer(BUFSIZE)
        n = os.readv(self.fd, [memoryview(buf).cast("B")])
        _libfuse().fuse_session_process_buf(self._se, ctypes.byref(
            _Buf(n, 0, ctypes.addressof(buf))))

    def busy(self) -> int:
        """Invalidations in flight in other threads."""
        return self._busy

    def _notify(self, call, *args) -> int:
        with self._lock:
            if self._closed:
                return -errno.ENODEV
            self._busy += 1
            se = self._se
        try:
            return call(se, *args)
        finally:
            with self._lock:
                self._busy -= 1

    def invalidate_entry(self, parent: int, name: bytes) -> int:
        """0, or -errno (-ENOENT: the kernel had not cached it). May block: the kernel can
        first need the answer to a request in flight, so call it from another thread."""
        return self._notify(_libfuse().fuse_lowlevel_notify_inval_entry, parent, name,
                            len(name))

    def invalidate_attr(self, ino: int) -> int:
        return self._notify(_libfuse().fuse_lowlevel_notify_inval_inode, ino, -1, 0)

    def close(self) -> None:
        """Unmount and free the session; not freed while an invalidation is still in flight
        in another thread (the process is about to exit)."""
        if self._se is None:
            return
        lib = _libfuse()
        with self._lock:
            self._closed = True
            busy = self._busy
        lib.fuse_session_unmount(self._se)
        if not busy:
            lib.fuse_session_destroy(self._se)
        self._se = None
