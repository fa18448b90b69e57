"""khofs record of a khofs mount seen through a bind (a namespace whose /sys/kernel/debug
is one) asks its daemon whose kernel it is; a tree the running kernel cannot have made is
refused until --release/--abi say whose it is."""

import os
import shutil
import subprocess

from khofs.devicetree.snapshot import not_from
from khofs.devicetree.snapshot import load, read_dir
from khofs_testlib import KHOFS
from khoit import write_bytes


def in_namespace(bind_src, *record_args):
    """khofs record in a private mount namespace whose /sys/kernel/debug is bind_src."""
    cmd = " ".join(f"'{a}'" for a in KHOFS + ["record", *record_args])
    return subprocess.run(["unshare", "-m", "sh", "-c",
                           f"mount --bind '{bind_src}' /sys/kernel/debug && {cmd}"],
                          capture_output=True, text=True, timeout=60)


def test_a_bound_khofs_mount_is_recorded_as_its_daemons_kernel(mount_khofs, tmp_path):
    m = mount_khofs("--abi", "6.16", "--release", "6.16.7-bound", "--memory", "1G",
                    cmdline="kho=on reserve_mem=4M:4096:oops")
    assert write_bytes(os.path.join(m.out, "finalize"), b"1") == 1
    snap = tmp_path / "ns.khosnap"
    r = in_namespace(m.path, str(snap))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("recorded 5 files of /sys/kernel/debug/kho (release 6.16.7-bound, "
                               "ABI 6.16, 1 sub-blob(s))")
    meta = load(str(snap)).meta
    assert (meta["release"], meta["abi"], meta["cmdline"]) == \
        ("6.16.7-bound", "6.16", "kho=on reserve_mem=4M:4096:oops")
    assert meta["source"]["kind"] == "khofs"


def test_a_tree_the_running_kernel_cannot_have_made(mount_khofs, tmp_path):
    m = mount_khofs("--abi", "7.1", "--memory", "1G")
    copy = tmp_path / "debug"
    copy.mkdir()
    shutil.copytree(m.kho, copy / "kho", copy_function=shutil.copy2)
    release = os.uname().release
    r = in_namespace(copy, str(tmp_path / "a.khosnap"))
    tree = read_dir(str(copy / "kho"))
    why = not_from(tree, release)
    if why is not None:                       # this host's kernel is not a 7.1
        assert r.returncode == 1
        assert r.stderr == (f"khofs: /sys/kernel/debug/kho is not the running kernel's (uname -r "
                            f"{release}): {why}; say whose it is with --release R and --abi P\n")
        assert not (tmp_path / "a.khosnap").exists()
    r = in_namespace(copy, str(tmp_path / "b.khosnap"), "--release", "7.1.0-khofs", "--abi", "7.1")
    assert r.returncode == 0, r.stderr
    # What each kind of evidence says, whatever this host runs.
    assert not_from(tree, "6.18.3") == ("its out/ has no finalize file, which a 6.18.3 kernel "
                                        "(ABI 6.18) has")
    assert not_from(tree, "7.1.9") == "its kexec-metadata blob names release 7.1.0-khofs"
    assert not_from(tree, "7.1.0-khofs") is None
    assert not_from(tree, "5.10.1") is None    # no KHO profile: nothing to compare
