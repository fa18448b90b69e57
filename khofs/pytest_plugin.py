"""pytest plugin: the `khofs` fixture gives each test a freshly booted emulated KHO debugfs.

    import pytest

    @pytest.mark.khofs(cmdline="kho=on reserve_mem=4M:4096:oops")
    def test_handover(khofs):
        khofs.finalize()
        assert (khofs.out / "sub_fdts" / "memblock").exists()
        khofs.kexec()
        assert (khofs.in_ / "sub_fdts" / "memblock").exists()

Each test process (each pytest-xdist worker) keeps one mount and reboots it (`khofs reboot`)
before every test with the marker's arguments: the test sees what a fresh mount with them
would boot, in about a millisecond instead of a mount's hundreds. A marker asking for what a
reboot cannot change (FUSE options, --state, replay=) or `fresh=True`, and the `khofs_fresh`
fixture, get a mount of their own for the test. A daemon that a test killed or wedged is
replaced. Whatever the plugin mounts is taken down, also when a test failed.
"""

import contextlib
import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from . import runtime

# `khofs mount` options a reboot sets, and their reboot request fields.
BOOT_OPTIONS = {"--cmdline": "cmdline", "--abi": "abi", "--release": "release",
                "--memory": "memory", "--nodes": "nodes", "--boot-reserved": "boot_reserved"}
# A reboot answers in about a millisecond; one that does not in this long is wedged.
REBOOT_TIMEOUT = 10.0


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
        self.mount_stderr = ""
        self._client = None
        self._shared = False            # a reused mount: stop() leaves it to its owner

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

    def reboot(self, **args) -> dict:
        """Cold-boot the kernel in place (khofs reboot)."""
        return self.ctl.reboot(**args)

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

    def _close_client(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None

    def stop(self) -> None:
        """Unmount whatever state the daemon is in; never raises."""
        self._close_client()
        if self._shared:
            return
        mnt = str(self.root)
        info = runtime.read_info(mnt) or {}
        pid = info.get("pid")
        if runtime.pid_alive(pid):
            # A stopped daemon (SIGSTOP) would make umount wait for it in vain.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        subprocess.run([sys.executable, "-m", "khofs", "umount", mnt],
                       stdin=subprocess.DEVNULL, capture_output=True)
        if runtime.find_mount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
        # `khofs umount` already waited for the daemon; kill one it could not stop.
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


def boot_fields(cmdline: str | None, args=(), abi=None, release=None) -> dict | None:
    """The reboot request (with khofs mount's defaults for what is not given) that boots what
    `khofs mount --cmdline CMDLINE ARGS --abi ABI --release RELEASE` would; None if the
    arguments hold anything a reboot cannot set."""
    fields = {}
    args = [str(a) for a in args]
    i = 0
    while i < len(args):
        opt, eq, value = args[i].partition("=")
        if opt not in BOOT_OPTIONS:
            return None
        if not eq:
            if i + 1 == len(args):
                return None
            i += 1
            value = args[i]
        i += 1
        if opt == "--nodes":
            try:
                value = int(value)
            except ValueError:
                return None         # its own mount says what is wrong with it
        fields[BOOT_OPTIONS[opt]] = value
    for key, value in (("cmdline", cmdline), ("abi", abi), ("release", release)):
        if value is not None:
            fields[key] = value
    return fields


class MountPool:
    """The one reused mount of a test process, rebooted for each test that can take it."""

    def __init__(self, base: Path):
        self.base = base
        self.mount: KhofsMount | None = None
        self.mounts = 0

    def get(self, fields: dict) -> KhofsMount:
        """The mount, booted with fields; mounted anew if its daemon died or is wedged."""
        from .client import Client, ControlError
        m = self.mount
        if m is not None and not _serving(m):
            m.stop()
            m = self.mount = None
        if m is not None:
            try:
                with Client(str(m.root), timeout=REBOOT_TIMEOUT) as c:
                    r = c.reboot(True, **fields)
                return self._view(m, r)
            except ControlError as e:
                if e.errno in (errno.EINVAL, errno.ERANGE):     # the daemon said no
                    raise RuntimeError(f"khofs reboot failed: {e.strerror}") from None
                m.stop()
                self.mount = None
            except (OSError, ValueError):     # a dead or wedged daemon, a broken reply
                m.stop()
                self.mount = None
        # A new path each time: a dead mount's may still be held by the test's processes.
        self.mounts += 1
        m = KhofsMount(self.base / f"khofs{self.mounts}", fields.get("cmdline"), _argv(fields))
        m.start()
        self.mount = m
        return self._view(m, None)

    @staticmethod
    def _view(m: KhofsMount, reply: dict | None) -> KhofsMount:
        # Each test gets its own object (and client) over the shared mount.
        view = KhofsMount(m.root, m.cmdline, m.args)
        view._shared = True
        view.mount_stderr = m.mount_stderr if reply is None else "".join(
            [f"kernel: {w}\n" for w in reply["warnings"]]
            + [f"khofs: {why}\n" for why in reply["ignored"]])
        return view

    def close(self) -> None:
        """Take the mount down."""
        if self.mount is not None:
            self.mount.stop()
            self.mount = None


def _serving(m: KhofsMount) -> bool:
    """Whether the mount's daemon runs: not gone, and not stopped (a stopped one would only
    be noticed when the reboot timed out)."""
    pid = (runtime.read_info(str(m.root)) or {}).get("pid")
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in "TtZX"


def _argv(fields: dict) -> list[str]:
    return [a for opt, key in BOOT_OPTIONS.items() if key != "cmdline" and key in fields
            for a in (opt, str(fields[key]))]


def pytest_configure(config):
    """Register the khofs marker."""
    config.addinivalue_line(
        "markers", 'khofs(cmdline="kho=on ...", args=[...], abi="7.1", release="...", '
        'replay="SNAPSHOT", fresh=False): the kernel command line, extra `khofs mount` '
        "arguments, ABI profile, uname -r, a snapshot (khofs record) to boot the successor of, "
        "and whether the test needs a mount of its own, for the khofs fixture")


@pytest.fixture(scope="session")
def khofs_pool(tmp_path_factory):
    """The test process's reused mount (one per pytest-xdist worker)."""
    pool = MountPool(tmp_path_factory.mktemp("khofs-shared"))
    try:
        yield pool
    finally:
        pool.close()


def _marker_kwargs(request) -> dict:
    marker = request.node.get_closest_marker("khofs")
    return dict(marker.kwargs) if marker else {}


@contextlib.contextmanager
def _own_mount(path, kwargs):
    replay = kwargs.get("replay")
    # A replay boots with the recorded command line unless the marker names one.
    cmdline = kwargs.get("cmdline", None if replay else "kho=on")
    with mounted(path, cmdline, kwargs.get("args", ()), kwargs.get("abi"),
                 kwargs.get("release"), replay) as m:
        yield m


@pytest.fixture
def khofs(request, khofs_pool):
    """A freshly booted khofs mount: the reused one rebooted with the marker's arguments, or
    one of its own for the test when a reboot cannot give what the marker asks."""
    kwargs = _marker_kwargs(request)
    fields = None
    if not kwargs.get("fresh") and kwargs.get("replay") is None:
        fields = boot_fields(kwargs.get("cmdline", "kho=on"), kwargs.get("args", ()),
                             kwargs.get("abi"), kwargs.get("release"))
    if fields is None:
        path = request.getfixturevalue("tmp_path") / "khofs"
        with _own_mount(path, kwargs) as m:
            yield m
        return
    m = khofs_pool.get(fields)
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture
def khofs_fresh(request, tmp_path):
    """A khofs mount of the test's own in a temporary directory, unmounted after the test
    whatever happens (the marker's arguments as for `khofs`)."""
    with _own_mount(tmp_path / "khofs", _marker_kwargs(request)) as m:
        yield m
