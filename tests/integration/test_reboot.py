"""khofs reboot: a cold boot in place gives the kernel a fresh mount with the same arguments
boots, whatever the old boot did; what cannot change in a reboot is refused."""

import json
import os
import stat

import pytest

from khofs.client import Client
from khofs.kernel.profile import PROFILES
from khoit import assert_removed, khofs, read, sh

pytestmark = pytest.mark.fuse

CMDLINE = "kho=on kho_scratch=16M,64M,16M reserve_mem=4M:4096:oops"
ARGS = ("--memory", "1G")

SUBTREE_DTS = '/dts-v1/;\n/ {\n    compatible = "rebooted-v1";\n};\n'


def snapshot(mnt) -> dict:
    """Everything a reader can see of a mount's kernel: each path's type, mode, size and
    bytes, in readdir order; the status (less what names this mount) and the log."""
    tree = {}
    for top, dirs, files in os.walk(mnt):
        rel = os.path.relpath(top, mnt)
        tree[rel] = ("dir", stat.S_IMODE(os.stat(top).st_mode), os.listdir(top))
        for name in files:
            p = os.path.join(top, name)
            st = os.stat(p)
            tree[os.path.join(rel, name)] = ("file", stat.S_IMODE(st.st_mode), st.st_size,
                                             read(p))
    st = json.loads(khofs("status", mnt, "--json").stdout)
    for key in ("pid", "mountpoint"):
        st.pop(key, None)
    return {"tree": tree, "status": st, "log": khofs("ctl", mnt, "log").stdout}


def reboot(mnt, *args):
    r = khofs("reboot", mnt, *args)
    assert r.returncode == 0, r.stderr
    return r


# What a boot may have done before the reboot; none of it may show afterwards.
def finalize(mnt, c):
    if c.status()["finalized"] is None:
        return False            # 7.1 has no finalize
    assert sh(f"echo 1 > {mnt}/kho/out/finalize").returncode == 0
    assert c.status()["finalized"] is True


def failed_finalize(mnt, c):
    c.subtree_add_dts("failing", SUBTREE_DTS)
    if c.status()["finalized"] is None:
        return                  # 7.1 has no finalize to fail
    c.fail("finalize", "ENOMEM")
    assert sh(f"echo 1 > {mnt}/kho/out/finalize").returncode != 0


def preserve(mnt, c):
    phys = c.mem_alloc(8192)
    c.mem_write(phys, b"\xa5" * 8192)
    c.preserve(phys, 8192)
    assert c.status()["preserved_bytes"] >= 8192


def subtree(mnt, c):
    c.subtree_add_dts("rebooted", SUBTREE_DTS)
    finalize(mnt, c)
    assert os.path.exists(f"{mnt}/kho/out/sub_fdts/rebooted")


def kexec(mnt, c):
    preserve(mnt, c)
    finalize(mnt, c)
    c.kexec()         # the same kernel again: a release would name its own profile
    assert os.path.isdir(f"{mnt}/kho/in")
    assert c.status()["kexec_count"] == 1


def loaded_image(mnt, c):
    finalize(mnt, c)
    c.call("kexec_load", cmdline="kho=on")
    assert c.status()["image_loaded"] is True


def kho_test_module(mnt, c):
    c.call("test_kho", seed=7)


SCENARIOS = [finalize, failed_finalize, preserve, subtree, kexec, loaded_image, kho_test_module]


@pytest.fixture(scope="module", params=sorted(PROFILES))
def pair(request, tmp_path_factory):
    """A fresh mount and one to reboot, both of one profile."""
    abi = request.param
    base = tmp_path_factory.mktemp(f"reboot-{abi}")
    mounts = []
    try:
        for name in ("fresh", "rebooted"):
            mnt = os.path.realpath(base / name)
            os.mkdir(mnt)
            r = khofs("mount", mnt, "--cmdline", CMDLINE, *ARGS, "--abi", abi)
            assert r.returncode == 0, r.stderr
            mounts.append(mnt)
        yield abi, mounts[0], mounts[1], snapshot(mounts[0])
    finally:
        for mnt in mounts:
            khofs("umount", mnt)


@pytest.mark.parametrize("before", SCENARIOS, ids=lambda f: f.__name__)
def test_a_rebooted_mount_is_a_fresh_one(pair, before):
    abi, fresh, mnt, want = pair
    with Client(mnt) as c:
        changed = before(mnt, c) is not False
    assert (snapshot(mnt) != want) == changed
    reboot(mnt)
    got = snapshot(mnt)
    assert got == want
    assert got["status"]["kexec_count"] == 0
    assert got["status"]["image_loaded"] is False and got["status"]["abi"] == abi


def test_reboot_with_other_arguments_boots_what_a_mount_with_them_boots(tmp_path):
    fresh, mnt = (os.path.realpath(tmp_path / n) for n in ("fresh", "rebooted"))
    os.mkdir(fresh)
    os.mkdir(mnt)
    other = ("--cmdline", "kho=on reserve_mem=1M:4096:other", "--abi", "7.0", "--release",
             "7.0.3-test", "--memory", "2G", "--nodes", "2", "--boot-reserved", "32M")
    try:
        assert khofs("mount", mnt, "--cmdline", CMDLINE, *ARGS).returncode == 0
        assert khofs("mount", fresh, *other).returncode == 0
        reboot(mnt, *other)
        want = snapshot(fresh)
        assert snapshot(mnt) == want
        # Options not given keep the mount's, which are now the reboot's.
        with Client(mnt) as c:
            c.subtree_add_dts("later", SUBTREE_DTS)
            assert c.reboot(cmdline=None)["release"] == "7.0.3-test"
        assert snapshot(mnt) == want
        # And back: the mount's first arguments given again.
        reboot(mnt, "--cmdline", CMDLINE, "--abi", "6.18", "--release", "6.18.0-khofs",
               *ARGS, "--nodes", "1", "--boot-reserved", "64M")
        assert khofs("umount", fresh).returncode == 0
        assert khofs("mount", fresh, "--cmdline", CMDLINE, *ARGS).returncode == 0
        assert snapshot(mnt) == snapshot(fresh)
    finally:
        khofs("umount", fresh)
        khofs("umount", mnt)


@pytest.mark.parametrize("opt", [("--stat-size", "zero"), ("--cache", "page"),
                                 ("-o", "allow_other"), ("--state", "/tmp/x"),
                                 ("--replay", "/tmp/x.khosnap")])
def test_what_a_reboot_cannot_change_is_one_clear_error(path_mounts, opt):
    mnt = path_mounts("--cmdline", CMDLINE, *ARGS)
    assert sh(f"echo 1 > {mnt}/kho/out/finalize").returncode == 0
    before = snapshot(mnt)
    r = khofs("reboot", mnt, *opt, "--cmdline", "kho=on")
    assert r.returncode == 1
    assert r.stderr == (f"khofs: reboot: {opt[0]} cannot change in a reboot (mount anew for "
                        "that) [EINVAL]\n")
    assert snapshot(mnt) == before          # nothing rebooted


@pytest.mark.parametrize("args, message", [
    (("--memory", "8M"), "0x800000 bytes over 1 nodes leaves less than 16 MiB per node [EINVAL]"),
    (("--boot-reserved", "2G"), "--boot-reserved does not fit in node 0 [EINVAL]"),
])
def test_a_kernel_that_cannot_boot_is_refused_and_the_old_one_runs_on(path_mounts, args,
                                                                      message):
    mnt = path_mounts("--cmdline", CMDLINE, *ARGS)
    assert sh(f"echo 1 > {mnt}/kho/out/finalize").returncode == 0
    before = snapshot(mnt)
    r = khofs("reboot", mnt, *args)
    assert (r.returncode, r.stderr) == (1, f"khofs: reboot: {message}\n")
    assert snapshot(mnt) == before


def test_a_descriptor_opened_before_the_reboot_is_of_a_removed_file(path_mounts):
    mnt = path_mounts("--cmdline", CMDLINE, *ARGS)
    assert sh(f"echo 1 > {mnt}/kho/out/finalize").returncode == 0
    fds = [os.open(f"{mnt}/kho/out/{name}", os.O_RDONLY)
           for name in ("fdt", "scratch_phys", "finalize", "sub_fdts/memblock")]
    try:
        reboot(mnt)
        for fd in fds:
            assert_removed(fd)
        # The paths name the new boot's files.
        assert read(f"{mnt}/kho/out/finalize") == b"0\n"
        assert not os.path.exists(f"{mnt}/kho/out/fdt")
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("cache", ["direct", "page"])
def test_readers_see_the_new_kernel_at_once(path_mounts, cache):
    mnt = path_mounts("--cmdline", CMDLINE, *ARGS, "--cache", cache)
    fd = os.open(f"{mnt}/kho/out/scratch_len", os.O_RDONLY)
    try:
        assert os.pread(fd, 100, 0) == b"0x1000000\n0x4000000\n0x1000000\n"
        assert os.listdir(f"{mnt}/kho/out/sub_fdts") == []
        assert sh(f"echo 1 > {mnt}/kho/out/finalize").returncode == 0
        assert os.listdir(f"{mnt}/kho/out/sub_fdts") == ["memblock"]
        reboot(mnt, "--cmdline", "kho=on kho_scratch=32M,96M,32M")
        assert read(f"{mnt}/kho/out/scratch_len") == b"0x2000000\n0x6000000\n0x2000000\n"
        assert os.listdir(f"{mnt}/kho/out/sub_fdts") == []
        assert_removed(fd)
    finally:
        os.close(fd)


def test_reboot_drops_the_state_dirs_handover(path_mounts, tmp_path):
    state = tmp_path / "state"
    mnt = path_mounts("--cmdline", CMDLINE, *ARGS, "--state", state)
    assert sh(f"echo 1 > {mnt}/kho/out/finalize").returncode == 0
    assert khofs("kexec", mnt).returncode == 0
    assert os.path.exists(state / "handover")
    reboot(mnt)
    assert not os.path.exists(state / "handover")
    rebooted = snapshot(mnt)
    assert rebooted["status"]["kexec_count"] == 0
    # A new mount of the state dir cold boots the same kernel.
    assert khofs("umount", mnt).returncode == 0
    path_mounts("--cmdline", CMDLINE, *ARGS, "--state", state)
    assert snapshot(mnt) == rebooted


def test_reboot_of_a_stopped_mount_is_one_clear_error(tmp_path):
    d = tmp_path / "none"
    d.mkdir()
    r = khofs("reboot", d)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"khofs: reboot: no khofs daemon answers for {d} ")


def test_client_reboot_to_khofs_mounts_defaults_with_sizes_as_text(path_mounts):
    mnt = path_mounts("--cmdline", CMDLINE, "--abi", "7.1", "--release", "7.1.9-x", "--memory",
                      "2G", "--nodes", "2", "--boot-reserved", "32M")
    with Client(mnt) as c:
        r = c.reboot(True, memory="1G", boot_reserved="0x2000000")
        assert (r["release"], r["abi"], r["cmdline"]) == ("6.18.0-khofs", "6.18", "kho=on")
        st = c.status()
        assert (st["memory_size"], st["nodes"]) == (1 << 30, 1)
        with pytest.raises(OSError) as e:
            c.reboot(memory="1Q")
        assert e.value.strerror == "'memory' = '1Q' is not a size (use e.g. 4G, 512M, 0x100000)"
        with pytest.raises(OSError) as e:
            c.call("reboot", defaults=1)
        assert e.value.strerror == "'defaults' must be true or false"
    fresh = path_mounts("--memory", "1G", "--boot-reserved", "32M", name="fresh")
    assert snapshot(mnt) == snapshot(fresh)
