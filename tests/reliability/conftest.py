"""Fixtures for the reliability suites: mounts that are always taken down, world-traversable
directories, an unprivileged user, and the per-family summary at the end of the run."""

import grp
import os
import pwd
import shutil
import signal
import subprocess
import tempfile

import pytest

import khofs_rel_support as sup
from khofs_testlib import cleaned_up
from khofs import runtime

TEST_USER = "khofs-test"


def pytest_terminal_summary(terminalreporter):
    if sup.FAMILY_RESULTS:
        terminalreporter.section("khofs reliability: inputs per family")
        for name, (tried, failed) in sup.FAMILY_RESULTS.items():
            terminalreporter.write_line(f"{name}: {tried} tried, {failed} failed")


def _daemon_pids_for(mnt):
    """Daemons whose command line names this mount point (ours: we started them)."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"khofs" in argv and b"mount" in argv and os.fsencode(mnt) in argv:
            pids.append(int(d))
    return pids


class Mounter:
    """Mounts khofs (and helper tmpfs/bind mounts) for one test; cleanup() removes them all."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.mounts = []          # khofs mount points, realpaths
        self.others = []          # tmpfs / bind mount targets
        self.dirs = []            # public directories to remove
        self.procs = []           # foreground daemons we started

    def public_dir(self, prefix="khofs-rel-"):
        """A 0755 directory under /tmp that any user can traverse."""
        d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
        os.chmod(d, 0o755)
        self.dirs.append(d)
        return d

    def mountpoint(self, name="mnt", parent=None):
        d = os.path.join(parent or str(self.tmp_path), name)
        os.makedirs(d, exist_ok=True)
        return os.path.realpath(d)

    def mount(self, *args, name="mnt", parent=None, at=None, check=True, timeout=60):
        mnt = at or self.mountpoint(name, parent)
        mnt = os.path.realpath(mnt)
        if mnt not in self.mounts:
            self.mounts.append(mnt)
        r = sup.khofs("mount", mnt, *args, timeout=timeout)
        if check:
            assert r.returncode == 0, f"khofs mount failed: {r.stderr.decode(errors='replace')}"
            assert sup.is_mounted(mnt)
            return mnt
        return r

    def foreground(self, *args, name="mnt", parent=None):
        """`khofs mount --foreground` as our child, so its exit status can be read."""
        mnt = self.mountpoint(name, parent)
        if mnt not in self.mounts:
            self.mounts.append(mnt)
        proc = subprocess.Popen(sup.KHOFS + ["mount", "--foreground", mnt, *map(str, args)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        self.procs.append(proc)

        def ready():
            if proc.poll() is not None:
                raise AssertionError(f"daemon exited early ({proc.returncode}): "
                                     f"{proc.stderr.read().decode(errors='replace')}")
            return sup.is_mounted(mnt) and os.path.exists(runtime.paths(mnt)["sock"])
        sup.wait_for(ready, 30, "the foreground daemon to mount")
        return mnt, proc

    def tmpfs(self, size="64k"):
        d = self.public_dir("khofs-rel-tmpfs-")
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", d],
                       check=True)
        self.others.append(d)
        return d

    def bind(self, src, dst):
        subprocess.run(["mount", "--bind", src, dst], check=True)
        self.others.append(dst)

    def cleanup(self):
        for mnt in reversed(self.mounts):
            if sup.is_mounted(mnt) or runtime.read_info(mnt):
                try:
                    sup.khofs("umount", mnt, timeout=40)
                except subprocess.TimeoutExpired:
                    pass
            while sup.is_mounted(mnt):
                r = subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
                if r.returncode != 0:
                    subprocess.run(["umount", "-l", mnt], capture_output=True)
                    if sup.is_mounted(mnt) and r.returncode != 0:
                        break
            for pid in _daemon_pids_for(mnt):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            runtime.remove_info(mnt)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
            for s in (proc.stdout, proc.stderr):
                if s:
                    s.close()
        for d in reversed(self.others):
            for _ in range(5):
                if not sup.is_mounted(d):
                    break
                subprocess.run(["umount", "-l", d], capture_output=True)
        for d in self.dirs:
            if not any(sup.is_mounted(m) for m in self.mounts + self.others if m.startswith(d)):
                shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def mounter(tmp_path):
    with cleaned_up(Mounter(tmp_path)) as m:
        yield m


@pytest.fixture(scope="session")
def unpriv_user():
    """(uid, gid) of a real unprivileged user, created if absent."""
    try:
        pw = pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", TEST_USER], check=True,
                       capture_output=True)
        pw = pwd.getpwnam(TEST_USER)
    assert pw.pw_uid != 0
    grp.getgrgid(pw.pw_gid)
    return pw.pw_uid, pw.pw_gid


@pytest.fixture
def as_user(unpriv_user):
    """Run a command as the unprivileged user: as_user(["cat", path]) -> CompletedProcess."""
    uid, gid = unpriv_user

    def run(argv, timeout=30, input=None):
        return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                               "--", *argv], capture_output=True, text=True, timeout=timeout,
                              input=input, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                              cwd="/")
    return run
