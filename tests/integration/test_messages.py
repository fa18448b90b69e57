"""What a new user met: every refusal is one line that says what is wrong and what to do,
a subcommand's usage on its own usage error, and khofs list / umount --all."""

import json
import os
import signal

import pytest

from khoit import daemon_pid, is_mounted, khofs, pid_alive, wait_until


def one_line(r):
    assert "Traceback" not in r.stderr and "Errno" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_subtree_add_of_a_missing_file(mount_khofs, tmp_path):
    m = mount_khofs()
    r = khofs("ctl", m, "subtree", "add", "foo", tmp_path / "missing.dts")
    assert r.returncode == 1
    assert one_line(r) == f"khofs: cannot read {tmp_path / 'missing.dts'}: No such file or directory"


def test_mount_on_a_file_says_it_is_not_a_directory(tmp_path):
    f = tmp_path / "passwd"
    f.write_text("x")
    r = khofs("mount", f)
    assert r.returncode == 1
    assert one_line(r) == f"khofs: mount point {f} is not a directory (khofs mounts on a directory)"
    r = khofs("mount", tmp_path / "none")
    assert "(create it with mkdir)" in one_line(r)


def test_an_unknown_fuse_option_is_named(tmp_path):
    from khofs import runtime
    d = tmp_path / "mnt"
    d.mkdir()
    r = khofs("mount", d, "-o", "bogusopt")
    assert r.returncode == 1
    assert one_line(r) == f"khofs: cannot mount on {d}: unknown option(s): `-o bogusopt'"
    assert not is_mounted(d)
    assert runtime.read_info(str(d)) is None


def test_a_subcommands_usage_error_shows_that_subcommands_usage(mount_khofs):
    m = mount_khofs()
    r = khofs("ctl", m, "mem", "free", "0x1000", "2M")
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        "usage: khofs ctl MOUNTPOINT mem free [-h] phys",
        "khofs ctl MOUNTPOINT mem free: error: unrecognized arguments: 2M"]
    r = khofs("status", m, "extra")
    assert r.returncode == 2 and r.stderr.startswith("usage: khofs status [-h] [--json] MOUNTPOINT")


def test_kexec_usage_and_mount_help():
    r = khofs("kexec", "--help")
    from khofs.kernel.profile import PROFILES
    assert r.stdout.splitlines()[0] == (
        "usage: khofs kexec [-h] [load|exec] MOUNTPOINT [--cmdline CMDLINE] "
        f"[--release RELEASE] [--abi {{{','.join(PROFILES)}}}] [--json]")
    r = khofs("kexec", "a", "b", "c")
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1] == \
        "khofs kexec: error: give one MOUNTPOINT, after load or exec if only that step"
    assert "khofs.test_kho=1" in " ".join(khofs("mount", "--help").stdout.split())


def test_status_of_a_dead_mount_says_how_to_clear_it(mount_khofs, tmp_path):
    m = mount_khofs()
    pid = daemon_pid(m)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(pid), what="the daemon to die")
    r = khofs("status", m)
    assert r.returncode == 1
    assert one_line(r) == (f"khofs: {m}: the khofs daemon of this mount is gone "
                           f"(Connection refused); clear it with: khofs umount {m}")
    assert khofs("umount", m).returncode == 0
    r = khofs("status", m)
    assert one_line(r) == (f"khofs: {m} is not a khofs mount (khofs list shows them; "
                           f"khofs mount {m} makes one)")
    assert one_line(khofs("ctl", tmp_path, "log")).startswith(f"khofs: {tmp_path} is not a khofs mount")
    assert one_line(khofs("kexec", tmp_path)).startswith(f"khofs: {tmp_path} is not a khofs mount")


@pytest.fixture
def own_runtime_dir(tmp_path, monkeypatch):
    # list and umount --all act on every mount of the runtime directory: a private one
    # keeps them to this test's mounts.
    monkeypatch.setenv("KHOFS_RUNTIME_DIR", str(tmp_path / "run"))


def test_list_and_umount_all(own_runtime_dir, mount_khofs):
    assert khofs("list").stdout == ""
    assert json.loads(khofs("list", "--json").stdout) == []
    a = mount_khofs(name="a")
    b = mount_khofs("--abi", "7.1", "--release", "7.1.3-x", name="b")
    assert khofs("kexec", a).returncode == 0
    rows = json.loads(khofs("list", "--json").stdout)
    assert rows == [
        {"mountpoint": a.path, "pid": daemon_pid(a), "abi": "6.18", "release": "6.18.0-khofs",
         "kexec_count": 1, "state": "running"},
        {"mountpoint": b.path, "pid": daemon_pid(b), "abi": "7.1", "release": "7.1.3-x",
         "kexec_count": 0, "state": "running"}]
    pid = daemon_pid(b)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(pid), what="the daemon to die")
    text = khofs("list").stdout.splitlines()
    assert text[0].split() == ["MOUNTPOINT", "PID", "ABI", "RELEASE", "KEXECS", "STATE"]
    assert text[1].split() == [a.path, str(daemon_pid(a)), "6.18", "6.18.0-khofs", "1", "running"]
    assert text[2].split() == [b.path, str(pid), "-", "-", "-", "dead", "(khofs", "umount",
                               "clears", "it)"]
    r = khofs("umount", "--all")
    assert r.returncode == 0
    assert r.stdout.splitlines() == [f"unmounted {a.path}", f"unmounted {b.path}"]
    assert not is_mounted(a) and not is_mounted(b)
    assert khofs("list").stdout == ""
    assert os.listdir(os.environ["KHOFS_RUNTIME_DIR"]) == []
    r = khofs("umount")
    assert r.returncode == 2 and "--all" in one_line(r)
