"""khofs run with real clients: Debian's kexec-tools and a C program doing what the
kernel's KHO selftest init does. Each outcome is read back through khofs status and kho/in/."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ecohelp import khofs as khofs_cli

pytestmark = [pytest.mark.fuse,
              pytest.mark.skipif(shutil.which("kexec") is None,
                                 reason="kexec-tools missing: run scripts/setup.sh")]

CLIENTS = Path(__file__).with_name("run_clients")


@pytest.fixture(scope="module")
def clients(tmp_path_factory):
    """kho_init built dynamic and static, and a 6.18 and a 7.1 image."""
    d = tmp_path_factory.mktemp("clients")
    src = CLIENTS / "kho_init.c"
    subprocess.run(["gcc", "-O2", "-o", d / "kho_init", src], check=True)
    subprocess.run(["gcc", "-O2", "-static", "-o", d / "kho_init_static", src], check=True)
    subprocess.run(["gcc", "-O2", "-static", "-pthread", "-o", d / "uname_threads",
                    CLIENTS / "uname_threads.c"], check=True)
    subprocess.run(["gcc", "-O2", "-o", d / "mnt", CLIENTS / "mnt.c"], check=True)
    subprocess.run(["gcc", "-O2", "-o", d / "kexec_file", CLIENTS / "kexec_file.c"], check=True)
    for rel in ("6.18.9", "7.1.2", "6.12.5"):
        khofs_cli("image", "--release", rel, "-o", d / f"img-{rel}", check=True)
    return d


def krun(m, *argv, timeout=60):
    """khofs run MNT -- ARGV through the command line."""
    return khofs_cli("run", m.root, "--", *argv, timeout=timeout)


def test_kexec_tools_reuse_cmdline_then_exec(khofs, clients):
    khofs.finalize()
    r = krun(khofs, "sh", "-c", f"kexec -s -l {clients}/img-6.18.9 --reuse-cmdline && "
             "cat /sys/kernel/kexec_loaded && kexec -e; echo not reached")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "1\n"                         # kexec_loaded, then nothing after -e
    assert "KHO: found kexec handover data" in r.stderr
    st = khofs.status()
    assert (st["kexec_count"], st["release"], st["cmdline"]) == (1, "6.18.9", "kho=on")
    assert st["kho_in"] and (khofs.in_ / "fdt").exists()


def test_kexec_tools_append_initrd_and_unload(khofs, clients, tmp_path):
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"\x07" * 5000)
    r = krun(khofs, "sh", "-c", f"kexec -s -l {clients}/img-6.18.9 --append='kho=on x=1' "
             f"--initrd={initrd} && cat /sys/kernel/kexec_loaded && kexec -s -u && "
             "cat /sys/kernel/kexec_loaded")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "1\n0\n"
    assert khofs.status()["kexec_loaded"] is False
    r = krun(khofs, "sh", "-c", f"kexec -s -l {clients}/img-7.1.2 --append='kho=on x=1' && kexec -e")
    st = khofs.status()
    assert (st["release"], st["abi"], st["cmdline"]) == ("7.1.2", "7.1", "kho=on x=1")
    # 6.18 did not finalize: the image carries no handover
    assert not st["kho_in"] and not (khofs.in_).exists()


def test_kexec_exec_nothing_loaded(khofs):
    r = krun(khofs, "kexec", "-e")
    assert r.returncode != 0
    assert khofs.status()["kexec_count"] == 0


def test_non_kernel_file_loads_nothing(khofs, tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a kernel\n" * 100)
    r = krun(khofs, "kexec", "-s", "-l", junk)
    assert r.returncode != 0
    assert "Cannot determine the file type" in r.stderr
    assert khofs.status()["kexec_loaded"] is False


def test_user_space_loader_carries_no_handover(khofs, clients):
    khofs.finalize()
    r = krun(khofs, "sh", "-c", f"kexec -l {clients}/img-6.18.9 --append='kho=on y=2' && kexec -e")
    assert r.returncode == 0, r.stderr
    st = khofs.status()
    assert (st["kexec_count"], st["cmdline"], st["kho_in"]) == (1, "kho=on y=2", False)


def test_view_of_the_machine(khofs, clients):
    r = krun(khofs, "sh", "-c", "uname -r; cat /proc/cmdline /proc/sys/kernel/osrelease "
             "/sys/kernel/kexec_loaded /sys/kernel/kexec_crash_loaded; "
             "ls /sys/kernel/debug/kho/out")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[:5] == ["6.18.0-khofs", "kho=on", "6.18.0-khofs", "0", "0"]
    assert "finalize" in r.stdout.splitlines()[5:]


@pytest.mark.parametrize("variant", ["kho_init", "kho_init_static"])
def test_selftest_client_6_18(khofs, clients, tmp_path, variant):
    dbg = tmp_path / "debugfs"
    dbg.mkdir()
    r = krun(khofs, clients / variant, dbg, clients / "img-6.18.9", "finalize")
    assert r.returncode == 0, r.stderr
    st = khofs.status()
    assert (st["kexec_count"], st["release"], st["cmdline"], st["kho_in"]) == \
        (1, "6.18.9", "kho=on", True)
    assert (khofs.in_ / "fdt").exists()
    assert not os.path.ismount(dbg)                 # the mount stayed inside the run


def test_selftest_client_forks(khofs, clients, tmp_path):
    dbg = tmp_path / "debugfs"
    dbg.mkdir()
    r = krun(khofs, clients / "kho_init_static", dbg, clients / "img-6.18.9", "finalize", "fork")
    assert r.returncode == 0, r.stderr
    assert khofs.status()["kexec_count"] == 1


@pytest.mark.khofs(abi="7.1")
def test_selftest_client_7_1_without_finalize(khofs, clients, tmp_path):
    dbg = tmp_path / "debugfs"
    dbg.mkdir()
    r = krun(khofs, clients / "kho_init", dbg, clients / "img-7.1.2", "nofinalize")
    assert r.returncode == 0, r.stderr
    st = khofs.status()
    assert (st["kexec_count"], st["release"], st["abi"], st["kho_in"]) == (1, "7.1.2", "7.1", True)
    assert (khofs.in_ / "fdt").exists()


def test_reboot_without_cap_sys_boot_is_eperm(khofs, clients):
    r = krun(khofs, "setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
             clients / "kho_init", "reboot")
    assert r.stdout == "reboot: EPERM\n"
    r = krun(khofs, clients / "kho_init", "reboot")
    assert r.stdout == "reboot: EINVAL\n"           # root, nothing loaded


def test_pre_kho_release_boots_without_kho(khofs, clients):
    khofs.finalize()
    r = krun(khofs, "sh", "-c", f"kexec -s -l {clients}/img-6.12.5 --reuse-cmdline && kexec -e")
    assert r.returncode == 0, r.stderr
    st = khofs.status()
    assert (st["release"], st["kho_enabled"]) == ("6.12.5", False)
    assert not khofs.kho.exists()


def test_python_run_returns_status_kexec_and_log(khofs, clients, tmp_path):
    khofs.finalize()
    assert khofs.run(["true"], stderr=subprocess.DEVNULL) == (0, False, [])
    assert khofs.run(["sh", "-c", "exit 3"], stderr=subprocess.DEVNULL)[:2] == (3, False)
    status, kexecd, log = khofs.run(["sh", "-c", f"kexec -s -l {clients}/img-6.18.9 "
                                     "--reuse-cmdline && kexec -e"], stderr=subprocess.DEVNULL)
    assert (status, kexecd) == (0, True)
    assert any("found kexec handover data" in line for line in log)
    # the two-phase pattern: the post-kexec step runs in the new kernel
    r = krun(khofs, "sh", "-c", "uname -r; ls /sys/kernel/debug/kho/in")
    assert r.stdout.splitlines()[0] == "6.18.9" and "fdt" in r.stdout


def test_bad_input(khofs, tmp_path):
    for args, text in (([tmp_path], "not a khofs mount"), ([khofs.root], "no command")):
        r = khofs_cli("run", *args, "--", *(["true"] if text != "no command" else []))
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and text in r.stderr, r.stderr
    r = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                        *khofs_cli.__globals__["KHOFS"], "run", khofs.root, "--", "true"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "needs root" in r.stderr and r.stderr.count("\n") == 1


def test_static_threaded_uname(khofs, clients):
    r = krun(khofs, clients / "uname_threads")
    assert r.stdout == "6.18.0-khofs\n" * 4


NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]


@pytest.mark.parametrize("fstype", ["debugfs", "proc", "sysfs"])
@pytest.mark.parametrize("target", ["dir", "missing", "file", ""])
@pytest.mark.parametrize("who", [[], NOBODY], ids=["root", "nobody"])
def test_mount_errno_as_the_real_kernel(khofs, clients, tmp_path, fstype, target, who):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").touch()
    path = str(tmp_path / target) if target else ""
    argv = [*who, clients / "mnt", fstype, path]
    real = subprocess.run(["unshare", "-m", *map(str, argv)], capture_output=True, text=True)
    ours = krun(khofs, *argv)
    assert ours.stdout == real.stdout and ours.stdout.strip()


def test_debugfs_mounted_by_the_tool_is_khofs(khofs, clients, tmp_path):
    (tmp_path / "dbg").mkdir()
    r = krun(khofs, "sh", "-c", f"{clients}/mnt debugfs {tmp_path}/dbg && "
             f"cat {tmp_path}/dbg/kho/out/finalize && mount -t proc proc /proc && cat /proc/cmdline "
             "&& mkdir -p /tmp/khofs-run-sys && mount -t sysfs sysfs /tmp/khofs-run-sys "
             "&& cat /tmp/khofs-run-sys/kernel/kexec_loaded "
             "&& ls /tmp/khofs-run-sys/kernel/debug/kho; rmdir /tmp/khofs-run-sys")
    assert r.stdout == "OK\n0\nkho=on\n0\nin\nout\n" or r.stdout == "OK\n0\nkho=on\n0\nout\n", r.stderr
    assert not os.path.ismount(tmp_path / "dbg")


@pytest.mark.khofs(cmdline="kho=on crashkernel=256M")
def test_crash_kernel_is_loaded_not_booted(khofs, clients):
    # kexec-tools' -p wants a "Crash kernel" line in the host's /proc/iomem, so the syscall
    # is made directly. ON_CRASH|NO_INITRAMFS, then UNLOAD|ON_CRASH.
    kf = clients / "kexec_file"
    r = krun(khofs, "sh", "-c", f"{kf} {clients}/img-6.18.9 6 'kho=on' && "
             "cat /sys/kernel/kexec_loaded /sys/kernel/kexec_crash_loaded; kexec -e")
    assert r.stdout == "OK\n0\n1\n"
    assert r.returncode != 0 and "Nothing has been loaded" in r.stderr
    st = khofs.status()
    assert (st["kexec_crash_loaded"], st["kexec_loaded"], st["kexec_count"]) == (True, False, 0)
    r = krun(khofs, "sh", "-c", f"{kf} fd:-1 3 && cat /sys/kernel/kexec_crash_loaded")
    assert r.stdout == "OK\n0\n"


@pytest.mark.parametrize("args, want", [
    (["img", "6"], "EADDRNOTAVAIL"),            # no crashkernel= on the command line
    (["img", "0x400"], "EINVAL"),               # an unknown flag
    (["fd:-1", "4"], "EBADF"),
    (["fd:99", "4"], "EBADF"),
    (["/etc/hostname", "4"], "ENOEXEC"),
    (["img", "0"], "EBADF"),                    # initrd fd -1 read without NO_INITRAMFS
    (["img", "4", "kho=on", "6"], "EINVAL"),    # the last byte is not NUL
    (["img", "4", "x" * 2100], "EINVAL"),       # longer than the header's cmdline_size
    (["img", "4", "kho=on", str(8 << 20)], "ENOMEM"),
])
def test_kexec_file_load_errno(khofs, clients, args, want):
    args = [str(clients / "img-6.18.9") if a == "img" else a for a in args]
    r = krun(khofs, clients / "kexec_file", *args)
    assert r.stdout == want + "\n", r.stderr
    assert khofs.status()["kexec_loaded"] is False


def test_kexec_file_load_eperm_as_nobody(khofs, clients):
    # permission comes before the fd is looked at
    r = krun(khofs, *NOBODY, clients / "kexec_file", "fd:-1", "4")
    assert r.stdout == "EPERM\n", r.stderr


def test_restart_cold_boots_the_machine(khofs, clients):
    khofs.finalize()
    khofs.kexec(release="6.18.9")
    assert "KHO: found kexec handover data" in khofs.ctl.call("log")["lines"][0]
    r = krun(khofs, "sh", "-c", f"kexec -s -l {clients}/img-6.18.9 && "
             f"{clients}/kho_init reboot 0x01234567; echo not reached")
    assert (r.returncode, r.stdout) == (0, ""), r.stderr
    st = khofs.status()
    # the mount's own kernel again: nothing kexec'd, loaded or finalized
    assert (st["kexec_count"], st["release"], st["kexec_loaded"]) == (0, "6.18.0-khofs", False)
    assert not st["finalized"]
    # a cold boot finds no handover: the kexec'd kernel's lines are gone, none printed
    assert (khofs.ctl.call("log")["lines"], r.stderr) == ([], "")


@pytest.mark.parametrize("cmd", ["0xCDEF0123", "0x4321FEDC"], ids=["halt", "power_off"])
def test_halt_and_power_off_end_the_run(khofs, clients, cmd):
    r = krun(khofs, "sh", "-c", f"{clients}/kho_init reboot {cmd}; echo not reached")
    assert (r.returncode, r.stdout) == (0, "")
    st = khofs.status()
    assert (st["kexec_count"], st["release"]) == (0, "6.18.0-khofs")    # the machine stays


def test_cad_and_unknown_reboot_commands(khofs, clients):
    r = krun(khofs, "sh", "-c", f"{clients}/kho_init reboot 0x89ABCDEF; "
             f"{clients}/kho_init reboot 0; {clients}/kho_init reboot 0x1234")
    assert r.stdout == "reboot: returned\nreboot: returned\nreboot: EINVAL\n"


def test_no_seccomp_user_notification(khofs, monkeypatch, capsys):
    from khofs.cli import main
    from khofs.run import notify
    monkeypatch.setattr(notify, "available", lambda: "this kernel has no seccomp user "
                        "notification (SECCOMP_RET_USER_NOTIF)")
    assert main(["run", str(khofs.root), "--", "true"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "seccomp user notification" in err
