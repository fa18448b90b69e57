"""Mounting, unmounting, and a daemon that dies or is told to stop."""

import errno
import os
import signal

import pytest

from khofs import runtime

from khoit import daemon_pid, is_mounted, khofs, pid_alive, read, sh, wait_until, write_bytes


def test_mount_on_missing_dir_fails(tmp_path):
    missing = tmp_path / "does-not-exist"
    r = khofs("mount", missing, "--cmdline", "kho=on")
    assert r.returncode != 0
    assert str(missing) in r.stderr
    assert "Traceback" not in r.stderr
    assert not missing.exists()
    assert not is_mounted(missing)


def test_mount_on_a_file_fails(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = khofs("mount", f, "--cmdline", "kho=on")
    assert r.returncode != 0
    assert str(f) in r.stderr
    assert "Traceback" not in r.stderr
    assert not is_mounted(f)


def test_mount_twice_fails(mount_khofs):
    m = mount_khofs(cmdline="kho=on", name="mnt")
    pid = daemon_pid(m)
    again = mount_khofs(cmdline="kho=on", name="mnt", check=False)
    assert again.result.returncode != 0
    assert m.path in again.result.stderr
    assert "Traceback" not in again.result.stderr
    # The first mount is untouched and still the only one there.
    assert os.listdir(m.out) == ["finalize", "scratch_len", "scratch_phys", "sub_fdts"]
    with open("/proc/self/mountinfo") as f:
        assert sum(line.split()[4] == m.path for line in f) == 1
    assert daemon_pid(m) == pid
    assert khofs("umount", m.path).returncode == 0
    assert not is_mounted(m.path)
    wait_until(lambda: not pid_alive(pid), what="the first daemon to exit")


def test_umount_removes_mount_and_daemon(mount_khofs):
    m = mount_khofs(cmdline="kho=on")
    pid = daemon_pid(m)
    assert pid_alive(pid)
    r = khofs("umount", m.path)
    assert r.returncode == 0, r.stderr
    assert not is_mounted(m.path)
    assert not pid_alive(pid)
    assert os.listdir(m.path) == []
    # Nothing of this mount is left in the runtime dir (info, socket, lock, log).
    left = [p for p in runtime.paths(os.path.realpath(m.path)).values() if os.path.exists(p)]
    assert left == []


def test_umount_not_mounted_fails(tmp_path):
    r = khofs("umount", tmp_path)
    assert r.returncode != 0
    assert str(tmp_path) in r.stderr


def test_sigkill_daemon_leaves_dead_mount_umount_clears_it(mount_khofs):
    m = mount_khofs(cmdline="kho=on", name="mnt")
    assert write_bytes(f"{m.out}/finalize", b"1\n") == 2
    pid = daemon_pid(m)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(pid), what="the daemon to die")
    with pytest.raises(OSError) as ei:
        os.listdir(m.path)
    assert ei.value.errno == errno.ENOTCONN
    r = sh(f"ls {m.path}")
    assert r.returncode != 0
    assert "Transport endpoint is not connected" in r.stderr
    assert is_mounted(m.path)
    busy = mount_khofs(cmdline="kho=on", name="mnt", check=False)
    assert busy.result.returncode == 1 and "already a mount point" in busy.result.stderr
    r = khofs("umount", m.path)
    assert r.returncode == 0, r.stderr
    assert not is_mounted(m.path)
    assert os.listdir(m.path) == []
    assert runtime.read_info(m.path) is None
    again = mount_khofs(cmdline="kho=on", name="mnt")
    assert os.listdir(again.out) == ["finalize", "scratch_len", "scratch_phys", "sub_fdts"]
    assert read(f"{again.out}/finalize") == b"0\n"           # a fresh boot, not finalized


def test_umount_of_a_killed_daemon_leaves_no_runtime_files(mount_khofs):
    m = mount_khofs(cmdline="kho=on")
    pid = daemon_pid(m)
    files = runtime.paths(os.path.realpath(m.path))
    assert os.path.exists(files["lock"]) and os.path.exists(files["sock"])
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(pid), what="the daemon to die")
    assert khofs("umount", m.path).returncode == 0
    assert [k for k, p in files.items() if os.path.exists(p)] == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_daemon_unmounts_itself(mount_khofs, sig):
    m = mount_khofs(cmdline="kho=on")
    pid = daemon_pid(m)
    os.kill(pid, sig)
    wait_until(lambda: not is_mounted(m.path), timeout=5, what="the mount to go away")
    wait_until(lambda: not pid_alive(pid), timeout=5, what="the daemon to exit")
    assert os.listdir(m.path) == []
    assert runtime.read_info(m.path) is None
    with open(runtime.paths(m.path)["log"], "rb") as f:
        assert b"Traceback" not in f.read()


def test_daemon_leaves_the_callers_job_but_stays_in_its_session(mount_khofs):
    m = mount_khofs(cmdline="kho=on")
    pid = daemon_pid(m)
    # A Ctrl-C or hangup sent to the job that ran `khofs mount` does not reach the daemon.
    assert os.getpgid(pid) == pid != os.getpgid(0)
    # The same session, so the same scheduling autogroup as the caller reading its files.
    assert os.getsid(pid) == os.getsid(0)
    if os.path.exists("/proc/self/autogroup"):
        with open(f"/proc/{pid}/autogroup") as a, open("/proc/self/autogroup") as b:
            assert a.read() == b.read()     # empty for both in the root group


def test_debug_fuse_logs_the_negotiated_connection_and_each_request(mount_khofs):
    m = mount_khofs("--debug-fuse", cmdline="kho=on")
    assert os.listdir(m.kho) == ["out"]     # a first boot has no kho/in
    with open(runtime.paths(m.path)["log"]) as f:
        log = f.read()
    # libfuse's INIT reply: READDIRPLUS always (1 << 13), never "auto" (1 << 14),
    # EXPORT_SUPPORT (1 << 4).
    reply = log.split("   INIT: ", 1)[1]
    flags = int(reply.split("flags=", 1)[1].split()[0], 16)
    assert flags & (1 << 13) and flags & (1 << 4) and not flags & (1 << 14)
    assert "READDIRPLUS nodeid 2" in log


def test_remount_after_umount(mount_khofs):
    m = mount_khofs(cmdline="kho=on", name="mnt")
    assert khofs("umount", m.path).returncode == 0
    m2 = mount_khofs("--memory", "1G", cmdline="kho=on kho_scratch=16M,64M,16M", name="mnt")
    assert m2.path == m.path
    with open(f"{m2.out}/scratch_len", "rb") as f:
        assert f.read() == b"0x1000000\n0x4000000\n0x1000000\n"

