"""pytest plugin: the `khofs` fixture mounts an emulated KHO debugfs for one test.

    import pytest

    @pytest.mark.khofs(cmdline="kho=on reserve_mem=4M:4096:oops")
    def test_handover(khofs):
        khofs.finalize()
        assert (khofs.out / "sub_fdts" / "memblock").exists()
        khofs.kexec()
        assert (khofs.in_ / "sub_fdts" / "memblock").exists()

The mount is always taken down after the test, also when the test failed or the daemon died.
"""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from . import runtime


class KhofsMount:
    """A mounted khofs: paths into the tree, and the control plane."""

    def __init__(self, mountpoint, cmdline: str | None = "kho=on", args=(),
                 abi: str | None = None, release: str | None = None, replay=None):
        self.root = Path(os.path.realpath(mountpoint))
        self.cmdline = cmdline          # None: khofs mount's default (with replay, the recorded)
        self.args = list(args)
        if replay is not None:
            self.args += ["--replay", str(replay)]
        if abi is not None:
            self.args += ["--abi", abi]
        if release is not None:
            self.args += ["--release", release]
        self.kho = self.root / "kho"
        self.out = self.kho / "out"
        self.in_ = self.kho / "in"
        self._client = None

    def start(self) -> "KhofsMount":
        """Mount and wait until it answers."""
        self.root.mkdir(parents=True, exist_ok=True)
        cmdline = [] if self.cmdline is None else ["--cmdline", self.cmdline]
        r = subprocess.run([sys.executable, "-m", "khofs", "mount", str(self.root), *cmdline,
                            *self.args],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True)
        self.mount_stderr = r.stderr
        if r.returncode != 0:
            raise RuntimeError(f"khofs mount failed ({r.returncode}): {r.stderr.strip()}")
        return self

    @property
    def ctl(self):
        """A khofs.Client connected to this mount's daemon."""
        if self._client is None:
            from .client import Client
            self._client = Client(str(self.root))
        return self._client

    def write_finalize(self, value: bytes) -> int:
        """One write(2) of value to out/finalize; the byte count."""
        fd = os.open(self.out / "finalize", os.O_WRONLY)
        try:
            return os.write(fd, value)
        finally:
            os.close(fd)

    def finalize(self) -> None:
        """echo 1 > out/finalize."""
        self.write_finalize(b"1\n")

    def abort(self) -> None:
        """echo 0 > out/finalize."""
        self.write_finalize(b"0\n")

    def kexec(self, cmdline: str | None = None, release: str | None = None,
              abi: str | None = None) -> dict:
        """Load and exec the next kernel."""
        return self.ctl.kexec(cmdline, release, abi)

    def run(self, argv, stderr=None) -> tuple[int, bool, list[str]]:
        """khofs run of argv on this machine: (exit status, kexec'd, the new boot's lines)."""
        from .run import run
        return run(str(self.root), [str(a) for a in argv], stderr=stderr)

    def status(self) -> dict:
        """The kernel's status."""
        return self.ctl.status()

    def log(self) -> list[str]:
        """This boot's kernel log lines."""
        return self.ctl.call("log")["lines"]

    def stop(self) -> None:
        """Unmount whatever state the daemon is in; never raises."""
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None
        mnt = str(self.root)
        info = runtime.read_info(mnt) or {}
        subprocess.run([sys.executable, "-m", "khofs", "umount", mnt],
                       stdin=subprocess.DEVNULL, capture_output=True)
        if runtime.find_mount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
        # `khofs umount` already waited for the daemon; kill one it could not stop.
        pid = info.get("pid")
        if runtime.pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def mounted(mountpoint, cmdline: str | None = "kho=on", args=(), abi=None, release=None,
            replay=None):
    """A khofs mount at mountpoint for the with block, then unmounted."""
    m = KhofsMount(mountpoint, cmdline, args, abi, release, replay)
    try:
        yield m.start()
    finally:
        m.stop()


def pytest_configure(config):
    """Register the khofs marker."""
    config.addinivalue_line(
        "markers", 'khofs(cmdline="kho=on ...", args=[...], abi="7.1", release="...", '
        'replay="SNAPSHOT"): the kernel command line, extra `khofs mount` arguments, ABI '
        "profile, uname -r, and a snapshot (khofs record) to boot the successor of, for the "
        "khofs fixture")


@pytest.fixture
def khofs(request, tmp_path):
    """A khofs mount in a temporary directory, unmounted after the test whatever happens."""
    marker = request.node.get_closest_marker("khofs")
    kwargs = marker.kwargs if marker else {}
    replay = kwargs.get("replay")
    # A replay boots with the recorded command line unless the marker names one.
    cmdline = kwargs.get("cmdline", None if replay else "kho=on")
    with mounted(tmp_path / "khofs", cmdline, kwargs.get("args", ()), kwargs.get("abi"),
                 kwargs.get("release"), replay) as m:
        yield m
