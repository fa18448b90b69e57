"""Permissions, as on debugfs, checked with a real unprivileged user."""

import os
import socket
import stat

import pytest

import khofs_rel_support as sup
from khofs import runtime

pytestmark = pytest.mark.fuse

DENIED = "Permission denied"


def test_without_allow_other_other_users_cannot_enter(mounter, as_user):
    parent = mounter.public_dir()
    mnt = mounter.mount("--memory", "1G", parent=parent)
    r = as_user(["stat", "-c", "%a", parent])
    assert r.returncode == 0 and r.stdout.strip() == "755", r
    for argv in (["stat", mnt], ["ls", mnt], ["cat", f"{mnt}/kho/out/scratch_phys"]):
        r = as_user(argv)
        assert r.returncode != 0 and DENIED in r.stderr, (argv, r)
    assert sup.read_file(f"{mnt}/kho/out/finalize") == b"0\n"


def test_file_modes_hold_for_other_users(mounter, as_user):
    parent = mounter.public_dir()
    mnt = mounter.mount("--cmdline", "kho=on reserve_mem=1M:4096:relperm", "--memory", "1G",
                        "-o", "allow_other", parent=parent)
    out = f"{mnt}/kho/out"
    assert stat.S_IMODE(os.stat(mnt).st_mode) == 0o700
    # The root is 0700 like debugfs's: not even kho/ can be reached.
    for argv in (["ls", mnt], ["ls", f"{mnt}/kho"], ["cat", f"{out}/scratch_phys"]):
        r = as_user(argv)
        assert r.returncode != 0 and DENIED in r.stderr, (argv, r)
    # chmod works on debugfs too; then the file modes themselves are what stops the user.
    os.chmod(mnt, 0o755)
    os.chmod(f"{mnt}/kho", 0o755)
    assert stat.S_IMODE(os.stat(mnt).st_mode) == 0o755
    r = as_user(["ls", out])
    assert r.returncode == 0, r
    assert sorted(r.stdout.split()) == ["finalize", "scratch_len", "scratch_phys", "sub_fdts"]
    for name in ("scratch_phys", "scratch_len", "finalize"):
        r = as_user(["cat", f"{out}/{name}"])
        assert r.returncode != 0 and DENIED in r.stderr, (name, r)
    for value in ("1", "0"):
        r = as_user(["sh", "-c", f"echo {value} > {out}/finalize"])
        assert r.returncode != 0 and DENIED in r.stderr, r
    assert sup.read_file(f"{out}/finalize") == b"0\n"
    sup.write_file(f"{out}/finalize", b"1\n")
    r = as_user(["ls", f"{out}/sub_fdts"])
    assert r.returncode == 0 and r.stdout.split() == ["memblock"], r
    for path in (f"{out}/fdt", f"{out}/sub_fdts/memblock"):
        r = as_user(["cat", path])
        assert r.returncode != 0 and DENIED in r.stderr, (path, r)
    r = as_user(["sh", "-c", f"echo 0 > {out}/finalize"])
    assert r.returncode != 0 and DENIED in r.stderr
    r = as_user(["chmod", "0666", f"{out}/finalize"])
    assert r.returncode != 0 and "Operation not permitted" in r.stderr, r
    assert sup.read_file(f"{out}/finalize") == b"1\n"
    assert stat.S_IMODE(os.stat(f"{out}/finalize").st_mode) == 0o600
    # Root still reads everything.
    assert sup.fdt_problem(sup.read_file(f"{out}/fdt"), "kho-v1") is None


def test_control_socket_is_root_only(mounter, as_user):
    mnt = mounter.mount("--memory", "1G")
    sock = runtime.paths(mnt)["sock"]
    st = os.stat(sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    probe = ("import socket, sys\n"
             "s = socket.socket(socket.AF_UNIX)\n"
             "try:\n    s.connect(sys.argv[1])\n    print('connected')\n"
             "except OSError as e:\n    print('errno', e.errno)\n")
    # Through its real path, and bound into a public directory so only the socket's own mode
    # stands in the way.
    pub = mounter.public_dir()
    alias = os.path.join(pub, "sock")
    open(alias, "w").close()
    mounter.bind(sock, alias)
    for path in (sock, alias):
        r = as_user(["/usr/bin/python3", "-c", probe, path])
        assert r.stdout.strip() in ("errno 13", "errno 1"), (path, r)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(alias)
        s.sendall(b'{"cmd": "status"}\n')
        assert b'"ok": true' in s.recv(4096)


def test_state_dir_is_private(mounter, as_user):
    pub = mounter.public_dir()
    fresh = os.path.join(pub, "fresh")
    mnt = mounter.mount("--memory", "1G", "--state", fresh, parent=pub)
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o700
    sup.write_file(f"{mnt}/kho/out/finalize", b"1\n")
    assert sup.khofs("kexec", mnt, timeout=60).returncode == 0
    h = os.stat(os.path.join(fresh, "handover"))
    assert stat.S_IMODE(h.st_mode) == 0o600 and h.st_uid == 0
    r = as_user(["ls", fresh])
    assert r.returncode != 0 and DENIED in r.stderr, r
    sup.khofs("umount", mnt, timeout=40)
    # A state dir that exists with looser permissions is tightened.
    loose = os.path.join(pub, "loose")
    os.mkdir(loose, 0o755)
    os.chmod(loose, 0o755)
    mounter.mount("--memory", "1G", "--state", loose, name="mnt2", parent=pub)
    assert stat.S_IMODE(os.stat(loose).st_mode) == 0o700
