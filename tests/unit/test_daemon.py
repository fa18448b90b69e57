"""The daemon's control path: a request runs on the loop's thread, the kernel forgets what
it removed before the reply, and a request that comes as the loop ends is refused."""

import errno
import json
import socket
import threading

import pytest

from khofs import control, fuseloop
from khofs.daemon import Daemon
from khofs.debugfs import ROOT_INO
from khofs.host import Host
from khofs.kernel.machine import MachineConfig


class Notes:
    """Stands in for the libfuse session: records the invalidations."""

    def __init__(self):
        self.entries, self.attrs, self.threads = [], [], set()

    def invalidate_entry(self, parent, name):
        self.threads.add(threading.current_thread())
        self.entries.append((parent, name))
        return 0

    def invalidate_attr(self, ino):
        self.attrs.append(ino)
        return 0


@pytest.fixture
def daemon(tmp_path):
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    d = Daemon(str(tmp_path), Host.boot("kho=on", MachineConfig()))
    d.session = Notes()
    d.loop = fuseloop.Loop(ours.fileno(), d.fuse, lambda entries: None)
    yield d
    d.loop.close()
    ours.close()
    kernel.close()


def request(d, **req):
    return d._control_request(json.dumps(req).encode())


def test_kexec_makes_the_kernel_forget_the_old_boot_before_the_reply(daemon):
    t = threading.Thread(target=daemon.loop.run, daemon=True)
    t.start()
    ran_on = []
    assert daemon.loop.call(lambda: ran_on.append(threading.current_thread())) is None
    assert ran_on == [t]
    out_ino, kho_ino = daemon.host.tree.out.ino, daemon.host.tree.out.parent.ino
    assert request(daemon, cmd="kexec")["ok"]
    notes = daemon.session
    # The old boot's entries, from kho/ down, and the root's attributes (its link count).
    assert notes.entries[:2] == [(ROOT_INO, b"kho"), (kho_ino, b"out")]
    assert sorted(notes.entries[2:]) == sorted((out_ino, name) for name in (
        b"sub_fdts", b"scratch_phys", b"scratch_len", b"finalize"))
    assert notes.attrs == [ROOT_INO]
    assert t not in notes.threads          # invalidated beside the loop, not on it
    daemon.loop.terminate()
    t.join(10)


def test_a_request_as_the_loop_ends_is_refused_and_changes_nothing(daemon):
    daemon.loop.terminate()
    daemon.loop.run()                      # returns at once
    r = request(daemon, cmd="mem_alloc", size=4096)
    assert r["ok"] is False and r["errno"] == errno.ESHUTDOWN and r["error"] == "ESHUTDOWN"
    assert daemon.control.user_allocs == {}
    assert daemon.session.entries == []


def test_a_failing_request_gets_eio_and_the_next_is_served(daemon, monkeypatch):
    t = threading.Thread(target=daemon.loop.run, daemon=True)
    t.start()
    real = daemon.control.handle_line

    def broken(line):
        monkeypatch.setattr(daemon.control, "handle_line", real)
        raise RuntimeError("a bug")
    monkeypatch.setattr(daemon.control, "handle_line", broken)
    r = request(daemon, cmd="status")
    assert r["ok"] is False and r["errno"] == errno.EIO and r["error"] == "EIO"
    assert request(daemon, cmd="status")["ok"]
    daemon.loop.terminate()
    t.join(10)


def test_control_socket_keeps_accepting_after_running_out_of_fds(tmp_path, monkeypatch):
    real_accept = socket.socket.accept
    failures = [OSError(errno.EMFILE, "Too many open files")]

    def accept(self):
        if failures:
            raise failures.pop()
        return real_accept(self)
    monkeypatch.setattr(socket.socket, "accept", accept)
    server = control.Server(str(tmp_path / "sock"), lambda line: {"ok": True, "echo": line.decode()})
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(10)
            c.connect(str(tmp_path / "sock"))
            c.sendall(b"hi\n")
            assert json.loads(c.makefile().readline()) == {"ok": True, "echo": "hi"}
        assert failures == []
    finally:
        server.close()
