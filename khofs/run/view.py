"""The machine the tool sees: bind mounts over what differs from the host.

Inside the run's private mount namespace only; the files behind the binds live in a
directory of the run (written by the supervisor as the emulated state changes).
"""

import ctypes
import errno
import os

# Python has no mount(2); libc's is called directly.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
NOT_NEW = MS_REMOUNT | MS_BIND | MS_MOVE | MS_UNBINDABLE | MS_PRIVATE | MS_SLAVE | MS_SHARED

FILES = ("cmdline", "osrelease", "kexec_loaded", "kexec_crash_loaded")


def mount(source, target, fstype, flags=0, data=None) -> int:
    """mount(2); 0 or its errno."""
    enc = (lambda s: None if s is None else os.fsencode(s))
    if _libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        return ctypes.get_errno() or errno.EIO
    return 0


def bind(source, target) -> int:
    """A bind mount of source over target; 0 or errno."""
    return mount(source, target, None, MS_BIND)


def write_files(viewdir: str, status: dict) -> None:
    """The files the binds show, from the emulated kernel's status; rewritten in place so
    every bind of them sees the change."""
    text = {"cmdline": status["cmdline"] + "\n", "osrelease": status["release"] + "\n",
            "kexec_loaded": "%d\n" % bool(status.get("kexec_loaded")),
            "kexec_crash_loaded": "%d\n" % bool(status.get("kexec_crash_loaded"))}
    for name, t in text.items():
        fd = os.open(os.path.join(viewdir, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o444)
        try:
            os.write(fd, t.encode())
        finally:
            os.close(fd)


def proc_binds(viewdir: str, proc: str) -> int:
    """/proc/cmdline and /proc/sys/kernel/osrelease of a proc mounted at proc."""
    return (bind(os.path.join(viewdir, "cmdline"), proc + "/cmdline")
            or bind(os.path.join(viewdir, "osrelease"), proc + "/sys/kernel/osrelease"))


def sys_binds(mnt: str, viewdir: str, sysfs: str) -> int:
    """debugfs and the kexec files of a sysfs mounted at sysfs. The host's kernel may have
    no kexec files to bind over, so <sysfs>/kernel becomes a directory of the run holding
    the host's entries (bound back) and the emulated files."""
    kdir = sysfs + "/kernel"
    n = 0
    while os.path.exists(os.path.join(viewdir, f"sys{n}")):
        n += 1
    work = os.path.join(viewdir, f"sys{n}")
    os.mkdir(work)
    for name in sorted(os.listdir(kdir)):
        src, dst = os.path.join(kdir, name), os.path.join(work, name)
        if name in ("kexec_loaded", "kexec_crash_loaded"):
            continue
        if os.path.isdir(src):
            os.mkdir(dst)
        else:
            open(dst, "w").close()
        err = mount(src, dst, None, MS_BIND | MS_REC)
        if err:
            return err
    for name in ("kexec_loaded", "kexec_crash_loaded"):
        open(os.path.join(work, name), "w").close()
        err = bind(os.path.join(viewdir, name), os.path.join(work, name))
        if err:
            return err
    if not os.path.isdir(os.path.join(work, "debug")):
        os.mkdir(os.path.join(work, "debug"))
    return (mount(work, kdir, None, MS_BIND | MS_REC)
            or bind(mnt, kdir + "/debug"))


def setup(mnt: str, viewdir: str) -> str | None:
    """The view on the namespace's own /proc and the host's /sys; None or what failed."""
    for what, err in (("/proc", proc_binds(viewdir, "/proc")),
                      ("/sys", sys_binds(mnt, viewdir, "/sys"))):
        if err:
            return f"cannot set up the run's {what}: {os.strerror(err)}"
    return None
