"""Through a 7.0 mount: `echo x > out/fdt` then a write of out/finalize oopses the emulated
kernel as a real 7.0.0 did (KHO-SPEC §9): the shell sees its child killed (137), the log has
the oops, status has the cause and the taint, and kho_out.lock stays held: later finalize
requests sleep until a kexec or the daemon stops (khofs umount, SIGTERM)."""

import errno
import json
import os
import signal
import subprocess
import sys

from khoit import ISSUE_ARGS, ISSUE_CMDLINE, daemon_pid, is_mounted, khofs, pid_alive, read, sh
from khoit import wait_until
from khofs import runtime

BUG = "BUG: kernel NULL pointer dereference, address: 0000000000000000"
CAUSE = "a write into out/fdt corrupted the live root FDT"
WRITER = ("import os, sys\n"
          "fd = os.open(sys.argv[1], os.O_WRONLY)\n"
          "try:\n"
          "    os.write(fd, b'1')\n"
          "    print('ok', flush=True)\n"
          "except OSError as e:\n"
          "    print(e.errno, flush=True)\n")


def mount70(mount_khofs):
    return mount_khofs("--abi", "7.0", *ISSUE_ARGS, cmdline=ISSUE_CMDLINE)


def fin(m):
    return os.path.join(m.out, "finalize")


def status(m):
    r = khofs("status", m.path, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def kernel_log(m):
    r = khofs("ctl", m.path, "log")
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def daemon_log(m):
    with open(runtime.paths(m.path)["log"]) as f:
        return f.read()


def oops(m):
    """echo x > out/fdt; then a child shell's echo 1 > out/finalize, killed by the oops."""
    assert sh(f"echo x > {m.out}/fdt").returncode == 0
    r = sh(f"bash -c 'echo 1 > {fin(m)}'; echo status=$?")
    assert r.stdout == b"status=137\n", (r.stdout, r.stderr)
    assert "Killed" in r.stderr
    return r


def sleeper(args):
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def asleep(m, n):
    return status(m)["oops"]["lock_waiters"] == n


def proc_state(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_70_finalize_after_a_write_into_out_fdt_kills_the_writer_and_logs_the_oops(
        mount_khofs):
    m = mount70(mount_khofs)
    oops(m)
    log = kernel_log(m)
    at = log.index(BUG)
    assert log[at + 1:at + 4] == ["#PF: supervisor write access in kernel mode",
                                  "#PF: error_code(0x0002) - not-present page",
                                  "Oops: 0002 [#1] SMP NOPTI"]
    assert log[at + 4].startswith("CPU: 0 UID: 0 PID: ")
    assert log[at + 4].endswith(" Comm: bash Not tainted 7.0.0-khofs #1")
    assert log[at + 5:at + 8] == ["RIP: 0010:kho_finalize", "Call Trace:", " <TASK>"]
    assert " kho_out_finalize_set" in log and "---[ end trace 0000000000000000 ]---" in log
    assert log[-1].startswith(f"khofs: oops cause: {CAUSE} (its first bytes are now "
                              "78 0a fe ed, not d0 0d fe ed)")
    pid = int(log[at + 4].split("PID: ")[1].split()[0])
    dlog = daemon_log(m)
    assert f"kernel: {BUG}\n" in dlog and "kernel: RIP: 0010:kho_finalize\n" in dlog
    assert f"khofs: killed bash (pid {pid}) with SIGKILL: it oopsed in kho_finalize" in dlog
    st = status(m)
    assert st["tainted"] == "G      D" and st["finalized"] is False
    assert st["oops"] == {"bug": BUG, "function": "kho_finalize", "cause": CAUSE, "pid": pid,
                          "comm": "bash", "lock": "kho_out.lock", "lock_waiters": 0}
    text = khofs("status", m.path).stdout.splitlines()
    assert f"oops:             {BUG} in kho_finalize (pid {pid}, bash, killed)" in text
    assert f"oops cause:       {CAUSE}" in text
    assert "tainted:          G      D" in text
    assert ("kho_out.lock:     held until a kexec or a reboot; 0 request(s) asleep on it"
            in text)
    # What does not take kho_out.lock still works: stat, a 0 (EINVAL), the tree, kexec load.
    assert os.stat(fin(m)).st_size == 2
    assert sh(f"echo 0 > {fin(m)}").stderr.endswith("Invalid argument\n")
    assert sorted(os.listdir(m.out)) == ["fdt", "finalize", "scratch_len", "scratch_phys",
                                         "sub_fdts"]
    assert khofs("kexec", "load", m.path).returncode == 0


def test_70_held_lock_sleeps_finalize_requests_until_a_kexec(mount_khofs, tmp_path):
    m = mount70(mount_khofs)
    oops(m)
    w = sleeper([sys.executable, "-c", WRITER, fin(m)])
    r = sleeper(["cat", fin(m)])
    try:
        wait_until(lambda: asleep(m, 2), what="two requests asleep on kho_out.lock")
        assert w.poll() is None and r.poll() is None
        dlog = daemon_log(m)
        assert ("khofs: FUSE WRITE (a write of out/finalize) sleeps on kho_out.lock, held "
                "since the oops in kho_finalize (Tainted: G      D 7.0.0-khofs)") in dlog
        assert "khofs: FUSE READ (a read of out/finalize) sleeps on kho_out.lock" in dlog
        # A producer that would take the lock is refused, not left hanging.
        (tmp_path / "t.dts").write_text("/dts-v1/;\n/ { compatible = \"t\"; };\n")
        c = khofs("ctl", m.path, "subtree", "add", "late", str(tmp_path / "t.dts"))
        assert c.returncode != 0 and len(c.stderr.splitlines()) == 1
        assert "kho_out.lock" in c.stderr and "Traceback" not in c.stderr
        k = khofs("kexec", m.path)
        assert k.returncode == 0, k.stderr
        assert "KHO: disabling KHO revival" in k.stdout.splitlines()
        assert w.wait(timeout=20) == 0 and w.stdout.read() == f"{errno.EIO}\n"
        assert r.wait(timeout=20) == 1 and "Input/output error" in r.stderr.read()
    finally:
        for p in (w, r):
            if p.poll() is None:
                p.kill()
    st = status(m)
    assert st["oops"] is None and st["tainted"] is None
    assert read(fin(m)) == b"0\n"
    assert sh(f"echo 1 > {fin(m)}").returncode == 0       # the new kernel's lock is free


def test_70_a_sleeper_survives_sigkill_and_umount_releases_it(mount_khofs):
    m = mount70(mount_khofs)
    oops(m)
    w = sleeper([sys.executable, "-c", WRITER, fin(m)])
    try:
        wait_until(lambda: asleep(m, 1), what="the writer asleep on kho_out.lock")
        wait_until(lambda: proc_state(w.pid) == "S", what="the writer asleep")
        # As on the kernel's mutex_lock: a signal does not end the sleep. FUSE keeps a
        # request the daemon has read waiting for its answer, uninterruptibly.
        os.kill(w.pid, signal.SIGKILL)
        wait_until(lambda: proc_state(w.pid) == "D", what="the killed writer still waiting")
        assert asleep(m, 1)
        u = khofs("umount", m.path)
        assert u.returncode == 0, u.stderr
        assert w.wait(timeout=20) == -signal.SIGKILL
    finally:
        if w.poll() is None:
            w.kill()
    assert not is_mounted(m.path)


def test_70_sigterm_answers_sleepers_with_eio(mount_khofs):
    m = mount70(mount_khofs)
    oops(m)
    pid = daemon_pid(m.path)
    r = sleeper(["cat", fin(m)])
    try:
        wait_until(lambda: asleep(m, 1), what="cat asleep on kho_out.lock")
        os.kill(pid, signal.SIGTERM)
        assert r.wait(timeout=20) == 1
        assert r.stderr.read() == f"cat: {fin(m)}: Input/output error\n"
    finally:
        if r.poll() is None:
            r.kill()
    wait_until(lambda: not pid_alive(pid), what="the daemon gone")
    assert not is_mounted(m.path)


def test_618_finalize_rebuilds_what_a_write_into_out_fdt_changed(mount_khofs):
    m = mount_khofs(*ISSUE_ARGS, cmdline=ISSUE_CMDLINE)
    assert sh(f"echo 1 > {fin(m)} && echo x > {m.out}/fdt").returncode == 0
    assert read(f"{m.out}/fdt")[:4] == b"x\n\xfe\xed"
    r = sh(f"echo 0 > {fin(m)} && echo 1 > {fin(m)}; echo status=$?")
    assert r.stdout == b"status=0\n"
    assert read(f"{m.out}/fdt")[:4] == b"\xd0\x0d\xfe\xed"
    assert status(m)["oops"] is None
    k = khofs("kexec", m.path)
    assert "Revived memory reservation 'oops' from KHO" in k.stdout


def test_70_reboot_ends_the_held_lock(mount_khofs):
    m = mount70(mount_khofs)
    oops(m)
    w = sleeper([sys.executable, "-c", WRITER, fin(m)])
    try:
        wait_until(lambda: asleep(m, 1), what="the writer asleep on kho_out.lock")
        r = khofs("reboot", m.path)
        assert r.returncode == 0, r.stderr
        assert w.wait(timeout=20) == 0 and w.stdout.read() == f"{errno.EIO}\n"
    finally:
        if w.poll() is None:
            w.kill()
    st = status(m)
    assert st["oops"] is None and st["tainted"] is None
    assert sh(f"echo 1 > {fin(m)}").returncode == 0
