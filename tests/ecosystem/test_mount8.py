"""mount(8) and fstab: mount.fuse runs `khofs SOURCE MNT -o OPTS`."""

import os
import subprocess

import pytest

from ecohelp import khofs, mounted

pytestmark = pytest.mark.fuse


def _mountinfo(mnt):
    target = os.path.realpath(mnt)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == target:
                sep = fields.index("-")
                return fields[sep + 1], fields[sep + 2], fields[sep + 3]
    return None


def test_mount_t_fuse_khofs(mnt, khofs_on_path):
    r = subprocess.run(["mount", "-t", "fuse.khofs", "none", str(mnt), "-o",
                        "cmdline=kho=on kho_scratch=16M,64M,16M reserve_mem=4M:4096:oops,"
                        "memory=1G,allow_other"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    fstype, source, opts = _mountinfo(mnt)
    assert (fstype, source) == ("fuse.khofs", "khofs")
    assert "allow_other" in opts.split(",")
    # The commas of kho_scratch= survived mount.fuse's option splitting.
    assert (mnt / "kho/out/scratch_len").read_bytes() == b"0x1000000\n0x4000000\n0x1000000\n"
    assert khofs("umount", mnt).returncode == 0
    assert not mounted(mnt)


def test_fstab_line(mnt, tmp_path, khofs_on_path):
    fstab = tmp_path / "fstab"
    fstab.write_text(f"none {mnt} fuse.khofs "
                     "cmdline=kho=on\\040reserve_mem=4M:4096:oops,memory=1G,auto_unmount 0 0\n")
    r = subprocess.run(["mount", "--fstab", str(fstab), str(mnt)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    fstype, source, _ = _mountinfo(mnt)
    assert (fstype, source) == ("fuse.khofs", "khofs")
    (mnt / "kho/out/finalize").write_bytes(b"1\n")
    assert sorted(os.listdir(mnt / "kho/out/sub_fdts")) == ["memblock"]
    assert khofs("umount", mnt).returncode == 0


def test_helper_form_directly(mnt):
    # What mount.fuse executes, with its "dev,suid" additions.
    r = khofs("none", mnt, "-o", "rw,cmdline=kho=on kho_scratch=1M,3M,1M,nodev,dev,suid")
    assert r.returncode == 0, r.stderr
    assert (mnt / "kho/out/scratch_len").read_bytes() == b"0x100000\n0x300000\n0x200000\n"
    assert khofs("umount", mnt).returncode == 0


def test_split_mount_options():
    from khofs.cli import helper_argv, split_mount_options
    assert split_mount_options('cmdline="kho=on kho_scratch=1M,2M,3M",allow_other') == \
        ["cmdline=kho=on kho_scratch=1M,2M,3M", "allow_other"]
    assert split_mount_options("cmdline=kho=on kho_scratch=16M,64M,16M reserve_mem=4M:4096:x,dev") \
        == ["cmdline=kho=on kho_scratch=16M,64M,16M reserve_mem=4M:4096:x", "dev"]
    assert helper_argv(["none", "/m", "-o", "rw,abi=6.16,stat_size=zero,auto_unmount,suid"]) == \
        ["mount", "/m", "--abi", "6.16", "--stat-size", "zero", "-o", "auto_unmount"]
    assert helper_argv(["mount", "/m"]) is None


def test_existing_tool_sees_khofs_at_the_real_path(mnt):
    # A private mount namespace with khofs bound over /sys/kernel/debug: the host's debugfs
    # is untouched and the tool uses its usual paths.
    assert khofs("mount", mnt, "--cmdline", "kho=on reserve_mem=4M:4096:oops").returncode == 0
    r = subprocess.run(["unshare", "-m", "sh", "-c",
                        f"mount --bind {mnt} /sys/kernel/debug && "
                        "cat /sys/kernel/debug/kho/out/finalize && "
                        "echo 1 > /sys/kernel/debug/kho/out/finalize && "
                        "ls /sys/kernel/debug/kho/out/sub_fdts"], capture_output=True, text=True)
    assert (r.returncode, r.stdout, r.stderr) == (0, "0\nmemblock\n", "")
    assert (mnt / "kho/out/finalize").read_bytes() == b"1\n"
    assert not os.path.exists("/sys/kernel/debug/kho/out/fdt")
