"""Helpers shared by the integration tests (imported by conftest and the tests)."""

import errno
import os
import subprocess
from pathlib import Path

from khofs_testlib import KHOFS, is_mounted, run_khofs, wait_for  # noqa: F401

wait_until = wait_for

ISSUE_CMDLINE = "kho=on kho_scratch=16M,64M,16M reserve_mem=4M:4096:oops"
ISSUE_ARGS = ("--memory", "1G")


# -- helpers ---------------------------------------------------------------------------
def khofs(*args, timeout=30):
    """khofs ARGS with text output."""
    return run_khofs(*args, timeout=timeout, text=True)


def sh(cmd, timeout=30):
    """Run cmd with bash; bytes stdout, text stderr."""
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, stdin=subprocess.DEVNULL,
                       timeout=timeout)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout,
                                       r.stderr.decode(errors="replace"))


def pid_alive(pid: int) -> bool:
    """False once every thread of pid has exited (so its /dev/fuse fd is closed)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    # A zombie leader can outlive its threads' exit only briefly; wait for them too.
    return state != "Z" or tasks != [str(pid)]


def daemon_pid(mnt) -> int:
    """The daemon's pid, from the runtime info `khofs mount` leaves under /run/khofs."""
    from khofs import runtime
    info = runtime.read_info(os.path.realpath(mnt))
    assert info and info.get("pid"), f"no runtime info for {mnt}"
    return int(info["pid"])


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def assert_removed(fd: int) -> None:
    """fd was opened on a file that is gone (an abort, a kexec, a reboot): reading it fails
    with EIO and fstat shows nlink 0, as a descriptor of a removed debugfs file."""
    try:
        os.read(fd, 4096)
    except OSError as e:
        assert e.errno == errno.EIO, f"read of a removed file: {os.strerror(e.errno)}"
    else:
        raise AssertionError("a removed file read without EIO")
    assert os.fstat(fd).st_nlink == 0


def write_bytes(path, data: bytes, flags=os.O_WRONLY):
    """One write(2) of data on a fresh open; the return value or the errno of the write."""
    fd = os.open(path, flags)
    try:
        return os.write(fd, data)
    except OSError as e:
        return errno.errorcode[e.errno]
    finally:
        os.close(fd)


# -- mounting ----------------------------------------------------------------------------
def rebooted(pool, args, cmdline):
    """(path, stderr) of the test process's reused mount, rebooted to boot what `khofs mount
    --cmdline CMDLINE ARGS` would; None if those need a mount of their own."""
    from khofs.pytest_plugin import boot_fields
    fields = None if pool is None else boot_fields(cmdline, [str(a) for a in args])
    if fields is None:
        return None
    m = pool.get(fields)
    return str(m.root), m.mount_stderr


class Mount:
    def __init__(self, path: str, result: subprocess.CompletedProcess):
        self.path = path
        self.result = result
        self.kho = os.path.join(path, "kho")
        self.out = os.path.join(path, "kho", "out")

    def __fspath__(self):
        return self.path

    def __str__(self):
        return self.path


class Mounter:
    """mounter(*extra, cmdline=, name=, check=) -> Mount. With a pool, a test's first unnamed
    mount is the reused one, rebooted (see khofs.pytest_plugin); the others are its own."""
    def __init__(self, base: Path, pool=None):
        self.base = base
        self.paths: list[str] = []
        self.pool = pool

    def __call__(self, *extra, cmdline="kho=on", name=None, check=True) -> Mount:
        if name is None and check:
            pool, self.pool = self.pool, None
            reused = rebooted(pool, extra, cmdline)
            if reused is not None:
                path, stderr = reused
                return Mount(path, subprocess.CompletedProcess(
                    ["mount", path, *extra], 0, "", stderr))
        d = self.base / (name or f"mnt{len(self.paths)}")
        d.mkdir(parents=True, exist_ok=True)
        path = os.path.realpath(d)
        if path not in self.paths:
            self.paths.append(path)
        args = ["mount", path] + ([] if cmdline is None else ["--cmdline", cmdline]) + list(extra)
        r = khofs(*args)
        if check:
            assert r.returncode == 0, f"khofs {args} exited {r.returncode}: {r.stderr}"
            assert is_mounted(path), f"{path} not in mountinfo after khofs mount"
        return Mount(path, r)

    def cleanup(self):
        for path in self.paths:
            if not is_mounted(path):
                continue
            try:
                ok = khofs("umount", path, timeout=20).returncode == 0
            except subprocess.TimeoutExpired:
                ok = False
            if not ok or is_mounted(path):
                subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True, timeout=10)


def khofs_bytes(*args, check=True, timeout=30, **kw):
    """Run khofs with bytes output; by default a non-zero exit fails the test."""
    return run_khofs(*args, check=check, timeout=timeout, **kw)


class PathMounts:
    """mounts(*args, name="mnt") -> realpath of a khofs mount under `base` (with a pool, a
    test's first unnamed one is the reused mount, rebooted); cleanup() always leaves nothing
    of its own mounted, and shows each daemon log (on failure)."""

    def __init__(self, base, pool=None):
        self.base, self.mounted, self.pool = base, [], pool

    def __call__(self, *args, name=None, check=True):
        if name is None and check:
            pool, self.pool = self.pool, None
            reused = rebooted(pool, args, None)
            if reused is not None:
                return reused[0]
        d = self.base / (name or "mnt")
        d.mkdir(exist_ok=True)
        mnt = os.path.realpath(d)
        if mnt not in self.mounted:
            self.mounted.append(mnt)
        r = khofs_bytes("mount", mnt, *args, check=False)
        if check:
            assert r.returncode == 0, f"mount failed: {r.stderr.decode(errors='replace')}"
            assert is_mounted(mnt)
        return mnt

    def cleanup(self):
        from khofs import runtime
        for mnt in self.mounted:
            log = runtime.paths(mnt)["log"]
            try:
                subprocess.run(KHOFS + ["umount", mnt], capture_output=True, timeout=30)
            except subprocess.TimeoutExpired:
                pass
            if is_mounted(mnt):
                subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True, timeout=10)
            try:
                with open(log, errors="replace") as f:
                    print(f"--- daemon log of {mnt}:\n{f.read()}")
                os.unlink(log)
            except FileNotFoundError:
                pass
