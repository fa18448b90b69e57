"""Faults: signals, kill -9 at random moments (also mid-kexec with --state), a busy mount
point, and a full disk under the state dir."""

import errno
import json
import os
import random
import signal
import subprocess
import threading
import time

import pytest

import khofs_rel_support as sup
from khofs import runtime
from khofs.client import Client
from khofs.kernel.handover import Handover

pytestmark = pytest.mark.fuse

SOAK = os.environ.get("KHOFS_SOAK") == "1"


def status(mnt):
    r = sup.khofs("status", mnt, "--json", timeout=30)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return json.loads(r.stdout)


def write_finalize(mnt, value):
    sup.write_file(f"{mnt}/kho/out/finalize", value)


def daemon_pid(mnt):
    info = runtime.read_info(mnt)
    assert info and sup.pid_alive(info["pid"]), f"no live daemon for {mnt}: {info}"
    return info["pid"]


def kill9(pid):
    os.kill(pid, signal.SIGKILL)
    sup.wait_for(lambda: not sup.pid_alive(pid), 15, "the killed daemon to go away")


# -- signals ------------------------------------------------------------------------------
@pytest.mark.parametrize("busy", [False, True], ids=["idle", "open-file"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_unmounts_cleanly(mounter, sig, busy):
    mnt, proc = mounter.foreground("--memory", "1G")
    paths = runtime.paths(mnt)
    held = None
    if busy:
        write_finalize(mnt, b"1\n")
        held = os.open(f"{mnt}/kho/out/fdt", os.O_RDONLY)
        os.read(held, 16)
    try:
        proc.send_signal(sig)
        try:
            rc = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the daemon ignored {sig.name} for 20s")
    finally:
        if held is not None:
            os.close(held)
    err = proc.stderr.read().decode(errors="replace")
    assert rc == 0, f"exit status {rc} after {sig.name}:\n{err}"
    assert "Traceback" not in err, err
    assert not sup.is_mounted(mnt)
    assert os.listdir(mnt) == []
    assert not os.path.exists(paths["sock"]) and runtime.read_info(mnt) is None


# -- kill -9 ----------------------------------------------------------------------------------
def test_kill9_at_random_moments_keeps_a_whole_handover(mounter, tmp_path):
    """Each round kills the daemon at a random moment; the state dir must hold the old or the
    new handover, a remount boots from it, and the preserved payload survives."""
    rng = random.Random(0x6B686F35)
    state = str(tmp_path / "state")
    args = ("--cmdline", "kho=on", "--memory", "1G", "--state", state)
    mnt = mounter.mount(*args)
    size = 8 << 20
    payload = rng.randbytes(size)
    hfile = os.path.join(state, "handover")

    def prepare():
        with Client(mnt) as c:
            c.mem_write(phys, payload) if first[0] else None
            c.preserve(phys, size)
        write_finalize(mnt, b"1\n")

    with Client(mnt) as c:
        phys = c.mem_alloc(size)
    first = [True]
    prepare()
    first[0] = False
    t0 = time.monotonic()
    r = sup.khofs("kexec", mnt, "--release", "r0", timeout=120)
    kexec_time = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    old = sup.read_file(hfile)
    rounds = 16 if SOAK else 4
    outcomes = []
    for n in range(1, rounds + 1):
        prepare()
        moment = rng.choice(["kexec", "kexec", "kexec", "reads", "idle"])
        pid = daemon_pid(mnt)
        stop = threading.Event()
        if moment == "kexec":
            proc = subprocess.Popen(sup.KHOFS + ["kexec", mnt, "--release", f"r{n}"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0, 1.5 * kexec_time))
        elif moment == "reads":
            def hammer():
                while not stop.is_set():
                    try:
                        sup.read_file(f"{mnt}/kho/out/fdt")
                    except OSError:
                        pass
            th = threading.Thread(target=hammer)
            th.start()
            time.sleep(rng.uniform(0, 0.05))
        kill9(pid)
        stop.set()
        if moment == "kexec":
            proc.wait(timeout=60)
        elif moment == "reads":
            th.join(10)
        r = sup.khofs("umount", mnt, timeout=40)
        assert r.returncode == 0, f"round {n}: umount of the dead mount: {r.stderr}"
        assert not sup.is_mounted(mnt)

        data = sup.read_file(hfile)
        prev = Handover.loads(old)
        if data == old:
            want = (prev.kexec_count, prev.release)
        else:
            new = Handover.loads(data)           # a torn file would not parse
            assert (new.kexec_count, new.release) == (prev.kexec_count + 1, f"r{n}"), \
                f"round {n}: the state dir holds an unexpected handover"
            want = (new.kexec_count, new.release)
        mounter.mount(*args, at=mnt)
        assert [x for x in os.listdir(state) if x != "handover"] == []
        st = status(mnt)
        assert (st["kexec_count"], st["release"]) == want, f"round {n} ({moment}): {st}"
        assert st["kho_in"] is True and st["finalized"] is False
        with Client(mnt) as c:
            assert c.mem_read(phys, size) == payload, f"round {n}: the payload did not survive"
        outcomes.append((moment, "new" if data != old else "old"))
        old = data
    print(f"\nkill -9 rounds: {outcomes}")


# -- a busy mount point -------------------------------------------------------------------------
def test_second_mount_on_a_busy_mount_point_fails_clearly(mounter):
    mnt = mounter.mount("--memory", "1G")
    pid = daemon_pid(mnt)
    r = mounter.mount("--memory", "1G", at=mnt, check=False)
    assert r.returncode == 1
    assert b"already a mount point" in r.stderr and b"khofs umount" in r.stderr, r.stderr
    assert sup.mount_count(mnt) == 1
    assert daemon_pid(mnt) == pid and status(mnt)["kexec_count"] == 0


@pytest.mark.parametrize("attempt", range(3))
def test_concurrent_mounts_on_one_mount_point(mounter, attempt):
    mnt = mounter.mountpoint()
    procs = [subprocess.Popen(sup.KHOFS + ["mount", mnt, "--memory", "1G"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    mounter.mounts.append(mnt)
    outs = [p.communicate(timeout=60) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], f"exit codes {codes}: {[o[1] for o in outs]}"
    assert sup.mount_count(mnt) == 1, f"{sup.mount_count(mnt)} khofs mounts stacked on {mnt}"
    status(mnt)
    r = sup.khofs("umount", mnt, timeout=40)
    assert r.returncode == 0 and not sup.is_mounted(mnt)


# -- a full disk under the state dir ------------------------------------------------------------
def test_full_disk_keeps_the_previous_state(mounter):
    disk = mounter.tmpfs("64k")
    state = os.path.join(disk, "state")
    mnt = mounter.mount("--cmdline", "kho=on", "--memory", "1G", "--state", state)
    assert os.stat(state).st_mode & 0o777 == 0o700
    with Client(mnt) as c:
        small = c.mem_alloc(8192)
        c.mem_write(small, b"s" * 8192)
        c.preserve(small, 8192)
    write_finalize(mnt, b"1\n")
    r = sup.khofs("kexec", mnt, "--release", "disk-1", timeout=60)
    assert r.returncode == 0, r.stderr
    hfile = os.path.join(state, "handover")
    old = sup.read_file(hfile)
    with open(os.path.join(disk, "filler"), "wb", buffering=0) as f:
        with pytest.raises(OSError) as ei:
            for _ in range(10000):
                f.write(b"\0" * 4096)
        assert ei.value.errno == errno.ENOSPC

    big_size = 256 << 10
    big = random.Random(7).randbytes(big_size)
    with Client(mnt) as c:
        phys = c.mem_alloc(big_size)
        c.mem_write(phys, big)
        c.preserve(phys, big_size)
    write_finalize(mnt, b"1\n")
    r = sup.khofs("kexec", mnt, "--release", "disk-2", timeout=60)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 1, f"kexec onto a full disk exited {r.returncode}: {err}"
    assert "previous state is intact" in err, err
    # Still the old boot, fully working.
    st = status(mnt)
    assert (st["kexec_count"], st["release"], st["finalized"]) == (1, "disk-1", True), st
    assert sup.read_file(f"{mnt}/kho/out/finalize") == b"1\n"
    assert os.path.exists(f"{mnt}/kho/out/fdt") and os.path.isdir(f"{mnt}/kho/in")
    with Client(mnt) as c:
        assert c.mem_read(phys, big_size) == big
    write_finalize(mnt, b"0\n")
    write_finalize(mnt, b"1\n")
    assert sorted(os.listdir(state)) == ["handover"]
    assert sup.read_file(hfile) == old
    # With room again, a handover that fits goes through (abort forgot every preservation).
    os.unlink(os.path.join(disk, "filler"))
    subprocess.run(["mount", "-o", "remount,size=256k", disk], check=True)
    write_finalize(mnt, b"0\n")
    with Client(mnt) as c:
        c.preserve(phys, 8192)
    write_finalize(mnt, b"1\n")
    r = sup.khofs("kexec", mnt, "--release", "disk-2", timeout=60)
    assert r.returncode == 0, r.stderr
    assert status(mnt)["kexec_count"] == 2 and sup.read_file(hfile) != old
    with Client(mnt) as c:
        assert c.mem_read(phys, 8192) == big[:8192]
