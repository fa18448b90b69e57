"""seccomp user notification: the filter the tool runs under, and the listener's ioctls.

libseccomp (Debian's python3-seccomp) compiles the filter; notifications are received and
answered with plain ioctls on the listener fd, which the supervisor gets from the tool's
side over a unix socket.
"""

import errno
import fcntl
import select
import struct
from dataclasses import dataclass

# Calls the run answers (x86_64). Everything else runs on the host as usual.
CAUGHT = ("kexec_file_load", "kexec_load", "reboot", "uname", "mount")

NOTIF = struct.Struct("<QIIiIQ6Q")        # struct seccomp_notif
RESP = struct.Struct("<QqiI")             # struct seccomp_notif_resp
IOCTL_NOTIF_RECV = 0xC0502100             # SECCOMP_IOWR(0, struct seccomp_notif)
IOCTL_NOTIF_SEND = 0xC0182101             # SECCOMP_IOWR(1, struct seccomp_notif_resp)
IOCTL_NOTIF_ID_VALID = 0x40082102         # SECCOMP_IOW(2, __u64)
USER_NOTIF_FLAG_CONTINUE = 1



@dataclass
class Notification:
    """One caught syscall of one thread."""
    id: int
    pid: int
    nr: int
    arch: int
    args: tuple


def available() -> str | None:
    """None if this kernel and Python can run a filter with user notification, else why not."""
    try:
        with open("/proc/sys/kernel/seccomp/actions_avail") as f:
            if "user_notif" not in f.read().split():
                return "this kernel has no seccomp user notification (SECCOMP_RET_USER_NOTIF)"
    except OSError:
        return "this kernel has no seccomp (/proc/sys/kernel/seccomp/actions_avail)"
    try:
        import seccomp  # noqa: F401
    except ImportError:
        return "libseccomp's Python binding is missing (Debian: python3-seccomp; run scripts/setup.sh)"
    return None


def install_filter() -> int:
    """Load the filter on the calling process; the listener fd."""
    import seccomp
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    # Root installs it, so no_new_privs is not needed: setuid programs in the run keep working.
    f.set_attr(seccomp.Attr.CTL_NNP, 0)
    # Other ABIs (32-bit, x32) run unfiltered instead of being killed (docs/run.md).
    f.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.ALLOW)
    for name in CAUGHT:
        f.add_rule(seccomp.NOTIFY, name)
    f.load()
    return f.get_notify_fd()


def syscall_numbers() -> dict[int, str]:
    """nr -> name of the caught calls (arch 0: the native one)."""
    import seccomp
    return {seccomp.resolve_syscall(0, n): n for n in CAUGHT}


def pending(fd: int) -> str:
    """'notif' when a notification waits, 'hup' when no task uses the filter any more,
    '' otherwise (without blocking: the receive ioctl blocks even then)."""
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLHUP)
    for _, ev in p.poll(0):
        if ev & select.POLLIN:
            return "notif"
        if ev & select.POLLHUP:
            return "hup"
    return ""


def receive(fd: int) -> Notification | None:
    """The next notification; None when its thread went away before we got it."""
    buf = bytearray(NOTIF.size)
    try:
        fcntl.ioctl(fd, IOCTL_NOTIF_RECV, buf, True)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.EINTR):
            return None
        raise
    nid, pid, _flags, nr, arch, _ip, *args = NOTIF.unpack(buf)
    return Notification(nid, pid, nr, arch, tuple(args))


def valid(fd: int, nid: int) -> bool:
    """The caller is still waiting in the syscall (its pid was not reused meanwhile)."""
    try:
        fcntl.ioctl(fd, IOCTL_NOTIF_ID_VALID, struct.pack("<Q", nid))
        return True
    except OSError:
        return False


def respond(fd: int, nid: int, val: int = 0, err: int = 0, cont: bool = False) -> None:
    """Answer: the syscall returns val, or fails with err, or runs on the host (cont)."""
    try:
        fcntl.ioctl(fd, IOCTL_NOTIF_SEND, RESP.pack(nid, val, -err if err else 0,
                                                     USER_NOTIF_FLAG_CONTINUE if cont else 0))
    except OSError as e:
        if e.errno != errno.ENOENT:        # the caller was killed meanwhile
            raise
