"""Integration tests: the control socket protocol, khofs.Client and `khofs ctl` errors."""

import base64
import errno
import json
import os
import socket
import stat
import subprocess

import pytest

from khofs import runtime
from khofs.client import Client, ControlError
from khoit import KHOFS, PathMounts, read, write_bytes
from khoit import khofs_bytes as khofs

pytestmark = pytest.mark.fuse

PAGE = 4096
MEM = 1 << 30
DTS = '/dts-v1/;\n/ { compatible = "ctl-test-v1"; };\n'


@pytest.fixture(scope="module")
def ctl_mnt(tmp_path_factory):
    """One mount shared by the rejected-request cases, each of which must change nothing."""
    m = PathMounts(tmp_path_factory.mktemp("ctl"))
    try:
        mnt = m("--cmdline", "kho=on", "--memory", "1G")
        with Client(mnt) as c:
            phys = c.mem_alloc(2 * PAGE)
            c.mem_write(phys, b"\xa5" * (2 * PAGE))
            c.preserve(phys, 2 * PAGE)
            c.subtree_add("taken", dtb())
        yield mnt, phys
    finally:
        m.cleanup()


def dtb(text=DTS):
    return subprocess.run(["dtc", "-q", "-I", "dts", "-O", "dtb", "-o", "-", "-"],
                          input=text.encode(), capture_output=True, check=True).stdout


def sock_path(mnt):
    return runtime.paths(os.path.realpath(mnt))["sock"]


def raw_exchange(mnt, lines):
    """Send raw request lines on one connection; one parsed reply per line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(sock_path(mnt))
        f = s.makefile("rb")
        out = []
        for line in lines:
            s.sendall(line + b"\n")
            reply = f.readline()
            assert reply, "the daemon closed the connection"
            out.append(json.loads(reply))
        return out


def snapshot(mnt, phys):
    with Client(mnt) as c:
        return (c.status(), c.call("subtree_list"), c.mem_read(phys, 2 * PAGE),
                c.mem_read(MEM - PAGE, PAGE))


def b64(data):
    return base64.b64encode(data).decode()


# (id, request: bytes or a function of phys -> dict, errno, words the message must contain)
BAD = [
    ("truncated-json", b'{"cmd": "status"', errno.EINVAL, ["bad JSON"]),
    ("not-utf8", b'\xff\xfe{}', errno.EINVAL, ["bad JSON"]),
    ("json-array", b'["status"]', errno.EINVAL, ["JSON object"]),
    ("json-string", b'"status"', errno.EINVAL, ["JSON object"]),
    ("no-cmd", lambda p: {"phys": p}, errno.EINVAL, ["'cmd'"]),
    ("cmd-not-string", lambda p: {"cmd": 7}, errno.EINVAL, ["'cmd'"]),
    ("unknown-cmd", lambda p: {"cmd": "frobnicate"}, errno.EOPNOTSUPP, ["frobnicate"]),
    ("missing-field", lambda p: {"cmd": "preserve", "phys": p}, errno.EINVAL,
     ["preserve", "missing", "size"]),
    ("unknown-field", lambda p: {"cmd": "status", "bogus": 1}, errno.EINVAL, ["unknown", "bogus"]),
    ("unknown-field-preserve", lambda p: {"cmd": "preserve", "phys": p, "size": PAGE, "flags": 0},
     errno.EINVAL, ["flags"]),
    ("phys-string", lambda p: {"cmd": "preserve", "phys": hex(p), "size": PAGE}, errno.EINVAL,
     ["'phys'", "integer"]),
    ("size-bool", lambda p: {"cmd": "preserve", "phys": p, "size": True}, errno.EINVAL,
     ["'size'", "integer"]),
    ("size-float", lambda p: {"cmd": "mem_alloc", "size": 4096.0}, errno.EINVAL, ["'size'"]),
    ("phys-negative", lambda p: {"cmd": "mem_read", "phys": -PAGE, "size": 16}, errno.ERANGE,
     ["'phys'"]),
    ("phys-too-big", lambda p: {"cmd": "mem_read", "phys": 1 << 64, "size": 16}, errno.ERANGE,
     ["'phys'"]),
    ("order-string", lambda p: {"cmd": "preserve_folio", "phys": p, "order": "0"}, errno.EINVAL,
     ["'order'"]),
    ("cmdline-not-string", lambda p: {"cmd": "kexec_load", "cmdline": 1}, errno.EINVAL,
     ["'cmdline'"]),
    ("data-not-base64", lambda p: {"cmd": "mem_write", "phys": p, "data": "%%%"}, errno.EINVAL,
     ["'data'", "base64"]),
    ("alloc-zero", lambda p: {"cmd": "mem_alloc", "size": 0}, errno.ERANGE, ["'size'"]),
    ("alloc-no-room", lambda p: {"cmd": "mem_alloc", "size": MEM}, errno.ENOMEM, ["free"]),
    ("read-beyond-memory", lambda p: {"cmd": "mem_read", "phys": 2 * MEM, "size": 16},
     errno.EFAULT, ["outside memory"]),
    ("write-across-end", lambda p: {"cmd": "mem_write", "phys": MEM - 2, "data": b64(b"abcd")},
     errno.EFAULT, ["outside memory"]),
    ("preserve-beyond-memory", lambda p: {"cmd": "preserve", "phys": MEM, "size": PAGE},
     errno.EFAULT, ["outside memory"]),
    ("preserve-unaligned-phys", lambda p: {"cmd": "preserve", "phys": p + 1, "size": PAGE},
     errno.EINVAL, ["aligned"]),
    ("preserve-unaligned-size", lambda p: {"cmd": "preserve", "phys": p, "size": 100},
     errno.EINVAL, ["aligned"]),
    ("folio-misaligned", lambda p: {"cmd": "preserve_folio", "phys": 0x101000, "order": 1},
     errno.EINVAL, ["aligned"]),
    ("subtree-name-clash", lambda p: {"cmd": "subtree_add", "name": "taken", "blob": b64(dtb())},
     errno.EEXIST, ["taken"]),
    ("subtree-invalid-blob", lambda p: {"cmd": "subtree_add", "name": "junk",
                                        "blob": b64(b"this is not a flattened device tree")},
     errno.EINVAL, ["junk", "valid FDT"]),
    ("subtree-truncated-blob", lambda p: {"cmd": "subtree_add", "name": "short",
                                          "blob": b64(dtb()[:-4])},
     errno.EINVAL, ["short", "valid FDT"]),
    ("subtree-bad-base64", lambda p: {"cmd": "subtree_add", "name": "x", "blob": "@@@"},
     errno.EINVAL, ["'blob'", "base64"]),
    ("subtree-bad-name", lambda p: {"cmd": "subtree_add", "name": "a/b", "blob": b64(dtb())},
     errno.EINVAL, ["'a/b'", "node name"]),
    ("subtree-non-ascii-name", lambda p: {"cmd": "subtree_add", "name": "caf\u00e9",
                                          "blob": b64(dtb())},
     errno.EINVAL, ["node name"]),
    ("data-non-ascii-base64", lambda p: {"cmd": "mem_write", "phys": p, "data": "AAAA\u00e9"},
     errno.EINVAL, ["'data'", "base64"]),
    ("json-nested-too-deep", b"[" * 100000, errno.EINVAL, ["bad JSON"]),
    ("subtree-preserve-not-bool", lambda p: {"cmd": "subtree_add", "name": "x", "blob": b64(dtb()),
                                             "preserve": 1},
     errno.EINVAL, ["'preserve'"]),
    ("subtree-remove-unknown", lambda p: {"cmd": "subtree_remove", "name": "nosuch"},
     errno.ENOENT, ["nosuch"]),
    ("mem-free-not-allocated", lambda p: {"cmd": "mem_free", "phys": 0x100000}, errno.ENOENT,
     ["0x100000"]),
    ("fail-unknown-errno", lambda p: {"cmd": "fail", "op": "finalize", "errno": "EBOGUS"},
     errno.EINVAL, ["errno", "EBOGUS"]),
    ("fail-errno-bool", lambda p: {"cmd": "fail", "op": "finalize", "errno": True},
     errno.EINVAL, ["errno"]),
    ("fail-unknown-op", lambda p: {"cmd": "fail", "op": "kexec", "errno": "ENOMEM"},
     errno.EINVAL, ["kexec"]),
    ("exec-without-load", lambda p: {"cmd": "kexec_exec"}, errno.ENOENT, ["no kexec image"]),
    ("release-empty", lambda p: {"cmd": "kexec", "release": ""}, errno.EINVAL, ["'release'"]),
]


@pytest.mark.parametrize("req,err,words", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_rejected_request_changes_nothing(ctl_mnt, req, err, words):
    mnt, phys = ctl_mnt
    before = snapshot(mnt, phys)
    line = req if isinstance(req, bytes) else json.dumps(req(phys)).encode()
    reply, after_on_same_conn = raw_exchange(mnt, [line, b'{"cmd": "status"}'])
    assert reply["ok"] is False, reply
    assert reply["errno"] == err, reply
    assert reply["error"] == errno.errorcode[err]
    for w in words:
        assert w in reply["message"], reply
    # The connection survives the error and the daemon's state is untouched.
    assert after_on_same_conn["ok"] is True
    after = snapshot(mnt, phys)
    assert after == before
    assert after[0]["preserved_bytes"] == before[0]["preserved_bytes"] > 0
    assert after[0]["finalized"] is False


def test_injected_failure_request_is_accepted_and_one_shot(path_mounts):
    # Counterpart of fail-unknown-errno: a valid fault injection is accepted (by name or number).
    mnt = path_mounts("--cmdline", "kho=on", "--memory", "1G")
    with Client(mnt) as c:
        c.fail("finalize", "eio")
        c.fail("finalize", errno.ENOSPC)
    fin = f"{mnt}/kho/out/finalize"
    seen = set()
    # os.write, not open(): a buffered file retries its pending data on close.
    fd = os.open(fin, os.O_WRONLY)
    try:
        for _ in range(2):
            with pytest.raises(OSError) as ei:
                os.write(fd, b"1")
            seen.add(ei.value.errno)
        assert seen == {errno.EIO, errno.ENOSPC}
        assert os.write(fd, b"1\n") == 2
    finally:
        os.close(fd)
    with Client(mnt) as c:
        assert c.status()["finalized"] is True


def test_preserve_while_finalized_is_ebusy(path_mounts):
    mnt = path_mounts("--cmdline", "kho=on", "--memory", "1G")
    with Client(mnt) as c:
        a = c.mem_alloc(PAGE)
        b = c.mem_alloc(4 * PAGE)
        c.preserve(a, PAGE)
    fd = os.open(f"{mnt}/kho/out/finalize", os.O_WRONLY)
    try:
        assert os.write(fd, b"1\n") == 2
    finally:
        os.close(fd)
    with open(f"{mnt}/kho/out/fdt", "rb") as f:
        fdt = f.read()
    with Client(mnt) as c:
        before = c.status()
        assert before["finalized"] is True
        for call in (lambda: c.preserve(b, PAGE), lambda: c.preserve_folio(b, 2),
                     lambda: c.call("unpreserve", phys=a, size=PAGE)):
            with pytest.raises(ControlError) as ei:
                call()
            assert ei.value.errno == errno.EBUSY
            assert "finalized" in ei.value.strerror
        assert c.status() == before
    r = khofs("ctl", mnt, "preserve", hex(b), PAGE, check=False)
    assert r.returncode == 1 and "EBUSY" in r.stderr.decode()
    with open(f"{mnt}/kho/out/fdt", "rb") as f:
        assert f.read() == fdt
    with open(f"{mnt}/kho/out/finalize", "rb") as f:
        assert f.read() == b"1\n"


def test_client_raises_control_error(ctl_mnt):
    mnt, phys = ctl_mnt
    before = snapshot(mnt, phys)
    with Client(mnt) as c:
        with pytest.raises(ControlError) as ei:
            c.preserve(phys + 1, PAGE)
        assert isinstance(ei.value, OSError)
        assert ei.value.errno == errno.EINVAL and "aligned" in ei.value.strerror
        with pytest.raises(ControlError) as ei:
            c.mem_read(2 * MEM, 8)
        assert ei.value.errno == errno.EFAULT
        with pytest.raises(ControlError) as ei:
            c.subtree_add("taken", dtb())
        assert ei.value.errno == errno.EEXIST
        assert c.status()["kho_enabled"] is True
    assert snapshot(mnt, phys) == before


def test_socket_is_private(ctl_mnt):
    mnt, _ = ctl_mnt
    st = os.stat(sock_path(mnt))
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == 0


def test_client_without_daemon(tmp_path):
    d = tmp_path / "nothing"
    d.mkdir()
    with pytest.raises(ControlError) as ei:
        Client(str(d))
    assert ei.value.errno in (errno.ENOENT, errno.ECONNREFUSED)
    r = khofs("ctl", d, "log", check=False)
    assert r.returncode == 1
    assert r.stderr.decode() == f"khofs: {d} is not a khofs mount (khofs list shows them; " \
                                f"khofs mount {d} makes one)\n"


CLI_BAD = [
    ("unaligned", lambda p, f: ["preserve", hex(p + 1), PAGE], "EINVAL"),
    ("unknown-errno", lambda p, f: ["fail", "finalize", "EBOGUS"], "EINVAL"),
    ("beyond-memory", lambda p, f: ["mem", "read", hex(2 * MEM), PAGE], "EFAULT"),
    ("name-clash", lambda p, f: ["subtree", "add", "taken", f], "EEXIST"),
    ("invalid-blob", lambda p, f: ["subtree", "add", "junk", f.with_suffix(".bin")], "EINVAL"),
    ("free-unallocated", lambda p, f: ["mem", "free", "0x100000"], "ENOENT"),
]


@pytest.mark.parametrize("args,ename", [c[1:] for c in CLI_BAD], ids=[c[0] for c in CLI_BAD])
def test_ctl_cli_error_output(ctl_mnt, tmp_path, args, ename):
    mnt, phys = ctl_mnt
    dts = tmp_path / "x.dts"
    dts.write_text(DTS)
    # Starts like an FDT so the CLI passes it on as a blob; the daemon rejects it.
    dts.with_suffix(".bin").write_bytes(b"\xd0\x0d\xfe\xed" + b"\0" * 60)
    before = snapshot(mnt, phys)
    r = khofs("ctl", mnt, *args(phys, dts), check=False)
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert err.startswith("khofs: ") and f"[{ename}]" in err, err
    assert r.stdout == b""
    assert snapshot(mnt, phys) == before


def test_kexec_cli_error_output(ctl_mnt):
    mnt, phys = ctl_mnt
    r = khofs("kexec", "exec", mnt, check=False)
    assert r.returncode == 1
    assert "ENOENT" in r.stderr.decode()
    with Client(mnt) as c:
        assert c.status()["kexec_count"] == 0


def test_dts_producer_registers_without_dtc(mount_khofs, tmp_path):
    m = mount_khofs()
    src = tmp_path / "p.dts"
    src.write_text('/dts-v1/;\n/ {\n\tcompatible = "nodtc-v1"; // a producer\n'
                   '\tfdt-size = /bits/ 64 <0x1000>;\n\tnames = "a", "b"; raw = [de ad];\n};\n')
    env = dict(os.environ, PATH="/nonexistent")      # no dtc, no shell tools
    r = subprocess.run(KHOFS + ["ctl", m.path, "subtree", "add", "nodtc", str(src)],
                       capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    bad = tmp_path / "bad.dts"
    bad.write_text('/dts-v1/;\n/ {\n\tx = <1 2>\n};\n')
    r = subprocess.run(KHOFS + ["ctl", m.path, "subtree", "add", "bad", str(bad)],
                       capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 1 and "line 4" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert write_bytes(f"{m.out}/finalize", b"1") == 1
    assert sorted(os.listdir(f"{m.out}/sub_fdts")) == ["nodtc"]
    ours = read(f"{m.out}/sub_fdts/nodtc")
    want = subprocess.run(["dtc", "-q", "-I", "dts", "-O", "dtb", "-o", "-", str(src)],
                          capture_output=True, check=True).stdout
    as_dts = [subprocess.run(["dtc", "-q", "-I", "dtb", "-O", "dts", "-"], input=b,
                             capture_output=True, check=True).stdout for b in (ours, want)]
    assert as_dts[0] == as_dts[1]
