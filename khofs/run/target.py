"""What the supervisor reads of a caught thread: its memory, fds and capabilities (/proc)."""

import errno
import os

from ..kernel.syscalls import read_file_errno

CAP_SYS_ADMIN = 21
CAP_SYS_BOOT = 22
PAGE = 4096


class Target:
    """One thread stopped in a caught syscall, seen through /proc/PID."""
    def __init__(self, pid: int):
        self.pid = pid
        self.proc = f"/proc/{pid}"

    def capable(self, cap: int) -> bool:
        """cap is in the thread's effective set."""
        try:
            with open(f"{self.proc}/status") as f:
                for line in f:
                    if line.startswith("CapEff:"):
                        return bool(int(line.split()[1], 16) >> cap & 1)
        except OSError:
            pass
        return False

    def creds(self) -> tuple[int, int, list[int]]:
        """Its filesystem uid, gid and supplementary groups."""
        uid = gid = 0
        groups = []
        with open(f"{self.proc}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    uid = int(line.split()[4])
                elif line.startswith("Gid:"):
                    gid = int(line.split()[4])
                elif line.startswith("Groups:"):
                    groups = [int(g) for g in line.split()[1:]]
        return uid, gid, groups

    def read(self, addr: int, size: int) -> bytes | int:
        """size bytes of its memory at addr, or EFAULT."""
        if size == 0:
            return b""
        try:
            fd = os.open(f"{self.proc}/mem", os.O_RDONLY)
        except OSError:
            return errno.EFAULT
        try:
            out = bytearray()
            while len(out) < size:
                chunk = os.pread(fd, min(size - len(out), 1 << 20), addr + len(out))
                if not chunk:
                    return errno.EFAULT
                out += chunk
            return bytes(out)
        except OSError:
            return errno.EFAULT
        finally:
            os.close(fd)

    def read_string(self, addr: int, limit: int = 4096) -> bytes | int:
        """A NUL-terminated string at addr (without its NUL), or EFAULT."""
        if addr == 0:
            return errno.EFAULT
        out = bytearray()
        while len(out) < limit:
            n = min(PAGE - (addr + len(out)) % PAGE, limit - len(out))
            chunk = self.read(addr + len(out), n)
            if isinstance(chunk, int):
                return chunk
            nul = chunk.find(b"\0")
            if nul >= 0:
                return bytes(out + chunk[:nul])
            out += chunk
        return errno.ENAMETOOLONG

    def write(self, addr: int, data: bytes) -> int:
        """Write data into its memory; 0 or EFAULT."""
        try:
            fd = os.open(f"{self.proc}/mem", os.O_WRONLY)
        except OSError:
            return errno.EFAULT
        try:
            return 0 if os.pwrite(fd, data, addr) == len(data) else errno.EFAULT
        except OSError:
            return errno.EFAULT
        finally:
            os.close(fd)

    def read_fd(self, fd: int) -> bytes | int:
        """kernel_read_file_from_fd of one of its fds: the bytes, or the kernel's errno."""
        if fd < 0:
            return errno.EBADF
        path = f"{self.proc}/fd/{fd}"
        try:
            st = os.stat(path)
            with open(f"{self.proc}/fdinfo/{fd}") as f:
                flags = next(int(line.split()[1], 8) for line in f if line.startswith("flags:"))
        except (OSError, StopIteration):
            return errno.EBADF
        readable = flags & os.O_ACCMODE != os.O_WRONLY
        why = read_file_errno(st.st_mode, readable, st.st_size)
        if why is not None:
            return why
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            return e.errno or errno.EIO

    def path(self, p: bytes) -> str:
        """p as the thread resolves it (its root and working directory)."""
        base = f"{self.proc}/root" if p.startswith(b"/") else f"{self.proc}/cwd/"
        return base + os.fsdecode(p)

    def plain_path(self, p: bytes) -> str:
        """p made absolute from its working directory, for a process that cannot follow
        /proc/PID/cwd (another user's); the run shares its root."""
        if p.startswith(b"/"):
            return os.fsdecode(p)
        return os.path.join(os.readlink(f"{self.proc}/cwd"), os.fsdecode(p))
