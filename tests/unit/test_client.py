"""khofs.Client against the protocol document: one typed, documented method per request,
and a reply that is not JSON is a ControlError."""

import errno
import inspect
import os
import re
import socket
import threading

import pytest

from khofs import runtime
from khofs.client import Client, ControlError
from khofs.daemon import syscalls  # noqa: F401  (registers the sys_* requests)
from khofs.daemon.control import COMMANDS

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "control-protocol.md")


def documented_requests() -> list[str]:
    with open(DOC) as f:
        text = f.read()
    table = text.split("## Commands", 1)[1].split("\n\n", 2)[1]
    return re.findall(r"^\| `([a-z_]+)` \|", table, re.M)


def test_the_document_lists_what_the_daemon_serves():
    assert sorted(documented_requests()) == sorted(COMMANDS)


@pytest.mark.parametrize("cmd", documented_requests())
def test_a_documented_typed_method_per_request(cmd):
    method = getattr(Client, cmd, None)
    assert callable(method), f"khofs.Client has no method {cmd}()"
    assert method.__doc__ and method.__doc__.strip()
    sig = inspect.signature(method)
    assert sig.return_annotation is not inspect.Signature.empty
    for name, p in sig.parameters.items():
        if name != "self":
            assert p.annotation is not inspect.Parameter.empty, f"{cmd}({name}) has no type"


def serve_once(path, reply: bytes, seen: list):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def run():
        conn, _ = srv.accept()
        with conn, conn.makefile("rb") as r:
            seen.append(r.readline())
            conn.sendall(reply)
        srv.close()
    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.mark.parametrize("reply", [b"<html>oops</html>\n", b"[1, 2]\n", b'{"no": "ok"}\n',
                                   b"\xff\xfe\n"])
def test_a_malformed_reply_is_a_control_error(tmp_path, monkeypatch, reply):
    monkeypatch.setenv("KHOFS_RUNTIME_DIR", str(tmp_path / "run"))
    mnt = str(tmp_path / "mnt")
    seen = []
    t = serve_once(runtime.paths(mnt)["sock"], reply, seen)
    try:
        with Client(mnt) as c, pytest.raises(ControlError) as e:
            c.status()
    finally:
        t.join(5)
    assert seen == [b'{"cmd": "status"}\n']
    assert e.value.errno == errno.EBADMSG
    assert "malformed reply" in e.value.strerror


def test_the_runtime_dir_can_be_moved(tmp_path, monkeypatch):
    monkeypatch.setenv("KHOFS_RUNTIME_DIR", str(tmp_path / "elsewhere"))
    p = runtime.paths("/some/mount")
    assert os.path.dirname(p["sock"]) == str(tmp_path / "elsewhere")
    assert os.path.isdir(tmp_path / "elsewhere")
