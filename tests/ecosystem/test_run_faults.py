"""khofs run ending badly: signals, a tool killed mid-call, the daemon killed. Nothing of the
run may remain, and the host's view must be as before."""

import os
import signal
import subprocess
import sys
import time

import pytest

from khofs.runtime import runtime_dir

pytestmark = pytest.mark.fuse

KHOFS = [sys.executable, "-m", "khofs"]


def host_view():
    """What the run must never change on the host."""
    out = {}
    for p in ("/proc/cmdline", "/proc/sys/kernel/osrelease", "/sys/kernel/kexec_loaded",
              "/sys/kernel/kexec_crash_loaded"):
        try:
            with open(p) as f:
                out[p] = f.read()
        except OSError as e:
            out[p] = e.errno
    out["debugfs"] = sorted(os.listdir("/sys/kernel/debug")) if os.path.isdir("/sys/kernel/debug") else None
    out["uname"] = os.uname().release
    return out


def mounts():
    """The host's mounts a run could leave: on /sys, /proc, /run/khofs (other engineers'
    tests mount elsewhere meanwhile)."""
    with open("/proc/self/mountinfo") as f:
        return sorted(line for line in f
                      if line.split()[4].startswith(("/sys", "/proc", "/run/khofs")))


def procs_with(marker: str):
    """pids whose command line holds marker."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        out.append(int(pid))
            except OSError:
                pass
    return out


def wait_gone(marker, timeout=10):
    end = time.monotonic() + timeout
    while procs_with(marker) and time.monotonic() < end:
        time.sleep(0.05)
    return procs_with(marker)


def start(m, marker, extra=""):
    """khofs run of a tool that announces itself, then sleeps (marker in its argv)."""
    return subprocess.Popen(KHOFS + ["run", str(m.root), "--", "sh", "-c",
                                     f"echo up; {extra} sleep 600; : {marker}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_signal_to_khofs_run_ends_everything(khofs, sig):
    before, mounts_before = host_view(), mounts()
    marker = f"khofs-fault-{sig.name}"
    p = start(khofs, marker)
    assert p.stdout.readline() == "up\n"
    p.send_signal(sig)
    p.wait(timeout=20)
    assert p.returncode != 0
    assert wait_gone(marker) == []
    assert wait_gone("khofs.run.init") == []
    assert mounts() == mounts_before
    assert host_view() == before
    if sig == signal.SIGKILL:
        # no khofs run was left to remove its view files: the next run does
        subprocess.run(KHOFS + ["run", str(khofs.root), "--", "true"], check=True)
    assert not os.path.exists(os.path.join(runtime_dir(), f"run-{p.pid}"))


def test_tool_killed(khofs, tmp_path):
    before = host_view()
    marker = "khofs-fault-tool"
    p = start(khofs, marker, extra="kill -KILL $$;")
    p.wait(timeout=20)
    assert p.returncode == 128 + signal.SIGKILL
    assert wait_gone(marker) == []
    assert host_view() == before
    assert khofs.status()["kexec_count"] == 0


def test_daemon_killed_during_run(khofs):
    before, marker = host_view(), "khofs-fault-daemon"
    p = start(khofs, marker)
    assert p.stdout.readline() == "up\n"
    from khofs import runtime
    pid = runtime.read_info(str(khofs.root))["pid"]
    os.kill(pid, signal.SIGKILL)
    p.wait(timeout=20)
    assert p.returncode == 1
    assert "daemon" in p.stderr.read()
    assert wait_gone(marker) == []
    assert wait_gone("khofs.run.init") == []
    assert host_view() == before


def in_syscall(pid: int) -> int | None:
    """The syscall number pid is blocked in, or None."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            return int(f.read().split()[0])
    except (OSError, IndexError, ValueError):
        return None


def test_tool_killed_mid_call(khofs, tmp_path):
    # With the tool started, the daemon is stopped, so the supervisor waits on it while the
    # tool sits inside a caught call (kexec_file_load, or the uname kexec-tools makes first);
    # the tool is killed there, then the daemon goes on.
    from khofs import runtime
    img = tmp_path / "img"
    subprocess.run(KHOFS + ["image", "--release", "6.18.9", "-o", str(img)], check=True)
    before = host_view()
    daemon = runtime.read_info(str(khofs.root))["pid"]
    marker = "khofs-fault-midcall"
    p = subprocess.Popen(KHOFS + ["run", str(khofs.root), "--", "sh", "-c",
                                  f'echo up; read go; exec kexec -s -l {img} --append {marker}'],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "up\n"
    try:
        os.kill(daemon, signal.SIGSTOP)
        p.stdin.write("go\n")
        p.stdin.flush()
        end = time.monotonic() + 20
        tool = []
        while time.monotonic() < end:
            tool = [pid for pid in procs_with(marker) if in_syscall(pid) in (63, 320)]
            if tool:
                break
            time.sleep(0.05)
        assert tool, "the tool never reached a caught call"
        os.kill(tool[0], signal.SIGKILL)
    finally:
        os.kill(daemon, signal.SIGCONT)
    p.wait(timeout=20)
    assert p.returncode == 128 + signal.SIGKILL
    assert wait_gone(marker) == []
    assert wait_gone("khofs.run.init") == []
    assert host_view() == before
    assert khofs.status()["kexec_count"] == 0       # the daemon and the mount carry on
