"""Answers to the caught calls: each read from the tool, judged by the emulated kernel
(through the daemon), written back."""

import base64
import errno
import os

from . import notify, view
from .link import LinkError
from .target import CAP_SYS_ADMIN, CAP_SYS_BOOT, Target
import khofs.kernel.syscalls as sc

UTS_LEN = 65                 # struct new_utsname: six fields of __NEW_UTS_LEN + 1


class RunEnds(Exception):
    """The run ends now: a kexec or restart rebooted the machine, or it halted."""
    def __init__(self, result: dict):
        super().__init__(result.get("action"))
        self.result = result


def _b64(v):
    return base64.b64encode(v).decode() if isinstance(v, bytes) else v


def _int(v: int) -> int:
    """A syscall's int argument (the low 32 bits, signed)."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


class Answers:
    """What the run answers for each caught call."""
    def __init__(self, mnt: str, viewdir: str, link, fd: int):
        self.mnt, self.viewdir, self.link, self.fd = mnt, viewdir, link, fd
        self.names = notify.syscall_numbers()
        self.status = None

    async def current(self) -> dict:
        """The status as of the last refresh (the run changes it only through its answers)."""
        if self.status is None:
            await self.refresh()
        return self.status

    async def refresh(self) -> dict:
        """The emulated kernel's status, and the view's files rewritten from it."""
        st = await self.link.call("status")
        view.write_files(self.viewdir, st)
        self.status = st
        return st

    async def handle(self, n: notify.Notification) -> None:
        """Answer one notification."""
        name = self.names.get(n.nr)
        t = Target(n.pid)
        try:
            res = await getattr(self, name)(n, t)
        except LinkError as e:
            if e.errno in (errno.ECONNRESET, errno.EPIPE):
                raise
            res = ("err", e.errno)
        if res is None:
            return
        if not notify.valid(self.fd, n.id):
            return                          # the caller died; nothing reaches it
        kind, v = res
        if kind == "cont":
            notify.respond(self.fd, n.id, cont=True)
        elif kind == "err":
            notify.respond(self.fd, n.id, err=v)
        else:
            notify.respond(self.fd, n.id, val=v)

    async def _sys(self, request, **fields):
        try:
            r = await self.link.call(request, **fields)
        finally:
            await self.refresh()
        return r

    # -- the calls -------------------------------------------------------------
    async def kexec_file_load(self, n, t: Target):
        """kexec_file_load(2): the fds and command line read, then the kernel's answer."""
        kernel_fd, initrd_fd, cmdline_len, cmdline_ptr, flags = n.args[:5]
        kernel_fd, initrd_fd = _int(kernel_fd), _int(initrd_fd)
        fields = {"cap_sys_boot": t.capable(CAP_SYS_BOOT), "flags": flags,
                  "cmdline_len": cmdline_len, "kernel": errno.EBADF}
        if not flags & sc.KEXEC_FILE_UNLOAD:
            fields["kernel"] = _b64(t.read_fd(kernel_fd))
            if not flags & sc.KEXEC_FILE_NO_INITRAMFS:
                fields["initrd"] = _b64(t.read_fd(initrd_fd))
            if 0 < cmdline_len <= sc.KMALLOC_MAX_SIZE:
                fields["cmdline"] = _b64(t.read(cmdline_ptr, cmdline_len))
        if not notify.valid(self.fd, n.id):
            return None
        await self._sys("sys_kexec_file_load", **fields)
        return ("val", 0)

    async def kexec_load(self, n, t: Target):
        """kexec_load(2): the segment table and buffers read, then the kernel's answer."""
        entry, nr, segs_ptr, flags = n.args[:4]
        fields = {"cap_sys_boot": t.capable(CAP_SYS_BOOT), "entry": entry, "nr_segments": nr,
                  "flags": flags}
        if 0 < nr <= sc.KEXEC_SEGMENT_MAX:
            segs = t.read(segs_ptr, nr * sc.SEGMENT.size)
            fields["segments"] = _b64(segs)
            if isinstance(segs, bytes):
                bufs = []
                for i in range(nr):
                    buf, bufsz, _, _ = sc.SEGMENT.unpack_from(segs, i * sc.SEGMENT.size)
                    b = t.read(buf, min(bufsz, 1 << 30))
                    if isinstance(b, int):
                        bufs = b
                        break
                    bufs.append(_b64(b))
                fields["bufs"] = bufs
        if not notify.valid(self.fd, n.id):
            return None
        await self._sys("sys_kexec_load", **fields)
        return ("val", 0)

    async def reboot(self, n, t: Target):
        """reboot(2): a kexec, restart or halt ends the run (RunEnds)."""
        magic1, magic2, cmd, arg = n.args[:4]
        fields = {"cap_sys_boot": t.capable(CAP_SYS_BOOT), "magic1": magic1 & 0xFFFFFFFF,
                  "magic2": magic2 & 0xFFFFFFFF, "reboot_cmd": cmd & 0xFFFFFFFF}
        if fields["reboot_cmd"] == sc.CMD_RESTART2:
            fields["arg"] = _b64(t.read_string(arg, 256))
        if not notify.valid(self.fd, n.id):
            return None
        r = await self._sys("sys_reboot", **fields)
        action = r["action"]
        if action == "kexec":
            raise RunEnds({"action": "kexec", "kexec": True, **r["kexec"]})
        if action == "restart":
            boot = await self.link.call("reboot")
            raise RunEnds({"action": "restart", "kexec": False, "log": boot.get("log", [])})
        if action in ("halt", "power_off"):
            raise RunEnds({"action": action, "kexec": False, "log": []})
        return ("val", 0)

    async def uname(self, n, t: Target):
        """uname(2): the host's struct new_utsname with the emulated release."""
        st = await self.current()
        u = os.uname()
        fields = (u.sysname, u.nodename, st["release"], u.version, u.machine,
                  _domainname())
        data = b"".join(os.fsencode(f)[:UTS_LEN - 1].ljust(UTS_LEN, b"\0") for f in fields)
        if not notify.valid(self.fd, n.id):
            return None
        err = t.write(n.args[0], data)
        return ("err", err) if err else ("val", 0)

    async def mount(self, n, t: Target):
        """mount(2): a new debugfs, proc or sysfs shows the emulated machine; the rest runs on the host."""
        src_p, tgt_p, type_p, flags, data_p = n.args[:5]
        if flags & view.NOT_NEW or not type_p:
            return ("cont", 0)
        fstype = t.read_string(type_p, 256)
        if isinstance(fstype, int) or fstype not in (b"debugfs", b"proc", b"sysfs"):
            return ("cont", 0)
        target = t.read_string(tgt_p)
        if isinstance(target, int):
            return ("err", target)
        if not target:
            return ("err", errno.ENOENT)
        path = t.path(target)
        # do_mount looks the target up (with the caller's rights) before path_mount asks
        # may_mount() for CAP_SYS_ADMIN.
        if t.capable(CAP_SYS_ADMIN):
            try:
                os.stat(path)
            except OSError as e:
                return ("err", e.errno)
        else:
            err = _lookup_as(t, target)
            return ("err", err or errno.EPERM)
        if not notify.valid(self.fd, n.id):
            return None
        if fstype == b"debugfs":
            err = view.mount(self.mnt, path, None, view.MS_BIND)
        else:
            data = t.read_string(data_p) if data_p else None
            if isinstance(data, int):
                return ("err", data)
            err = view.mount(fstype.decode(), path, fstype.decode(), flags, data)
            if not err:
                await self.refresh()
                err = (view.proc_binds(self.viewdir, path) if fstype == b"proc"
                       else view.sys_binds(self.mnt, self.viewdir, path))
        return ("err", err) if err else ("val", 0)


def _lookup_as(t: Target, target: bytes) -> int:
    """The errno of looking target up with the thread's uid, gid and groups (0: found).
    A forked child takes those rights and is reaped here at once, so the run's reaper
    (PID 1 collects every child) never races for it."""
    try:
        uid, gid, groups = t.creds()
        path = t.plain_path(target)
    except OSError:
        return errno.ESRCH
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            os.stat(path)
            os._exit(0)
        except OSError as e:
            os._exit(e.errno or errno.EIO)
        except BaseException:
            os._exit(errno.EIO)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _domainname() -> str:
    try:
        with open("/proc/sys/kernel/domainname") as f:
            return f.read().strip()
    except OSError:
        return "(none)"
