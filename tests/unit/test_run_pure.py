"""khofs run's pieces that need no namespace: the seccomp structures and ioctl numbers, reading
a process through /proc, the view's files, segment placement."""

import ctypes
import errno
import os

from khofs.kernel import kexec_mem
from khofs.run import notify, view
from khofs.run.target import Target


def _iowr(nr, size, write=True, read=True):
    # asm-generic/ioctl.h: dir << 30 | size << 16 | type << 8 | nr, type '!' for seccomp
    return (int(write) | int(read) << 1) << 30 | size << 16 | ord("!") << 8 | nr


def test_seccomp_structures_and_ioctls():
    assert notify.NOTIF.size == 80 and notify.RESP.size == 24
    assert notify.IOCTL_NOTIF_RECV == _iowr(0, 80)
    assert notify.IOCTL_NOTIF_SEND == _iowr(1, 24)
    assert notify.IOCTL_NOTIF_ID_VALID == _iowr(2, 8, write=True, read=False)
    assert notify.USER_NOTIF_FLAG_CONTINUE == 1


def test_caught_calls_resolve_to_x86_64_numbers():
    assert notify.syscall_numbers() == {320: "kexec_file_load", 246: "kexec_load",
                                        169: "reboot", 63: "uname", 165: "mount"}


def test_target_reads_and_writes_memory():
    t = Target(os.getpid())
    buf = ctypes.create_string_buffer(b"kho=on\0tail", 16)
    addr = ctypes.addressof(buf)
    assert t.read(addr, 6) == b"kho=on"
    assert t.read_string(addr) == b"kho=on"
    assert t.read(0, 8) == errno.EFAULT
    assert t.read_string(0) == errno.EFAULT
    assert t.write(addr, b"KHO") == 0 and buf.raw[:6] == b"KHO=on"
    assert t.write(8, b"x") == errno.EFAULT


def test_target_reads_fds_as_kernel_read_file(tmp_path):
    t = Target(os.getpid())
    f = tmp_path / "k"
    f.write_bytes(b"kernel")
    empty = tmp_path / "e"
    empty.touch()
    fds = [os.open(f, os.O_RDONLY), os.open(f, os.O_WRONLY), os.open(empty, os.O_RDONLY),
           *os.pipe()]
    try:
        assert t.read_fd(fds[0]) == b"kernel"
        assert t.read_fd(fds[1]) == errno.EBADF        # not open for reading
        assert t.read_fd(fds[2]) == errno.EINVAL       # empty
        assert t.read_fd(fds[3]) == errno.EINVAL       # not a regular file
        assert t.read_fd(-1) == errno.EBADF
        assert t.read_fd(9999) == errno.EBADF
    finally:
        for fd in fds:
            os.close(fd)


def test_view_files(tmp_path):
    view.write_files(str(tmp_path), {"cmdline": "kho=on x", "release": "7.1.2",
                                     "kexec_loaded": True, "kexec_crash_loaded": False})
    got = {n: (tmp_path / n).read_text() for n in view.FILES}
    assert got == {"cmdline": "kho=on x\n", "osrelease": "7.1.2\n", "kexec_loaded": "1\n",
                   "kexec_crash_loaded": "0\n"}


def test_segments_placed_top_down_in_scratch():
    areas = [(0x1000000, 0x400000)]
    segs = kexec_mem.image_segments(16 << 10, 1024, None, 8)
    assert [s for s, _ in segs] == [24 << 10, 4096 + 8, (16 << 10) - 1024]
    at = kexec_mem.place(areas, segs)
    assert at == [0x1000000 + 0x400000 - (24 << 10), 0x1000000 + 0x400000 - (24 << 10) - 0x2000,
                  0x1200000]
    assert kexec_mem.place([(0x1100000, 0x100000)], segs) is None    # no 2 MiB aligned room
