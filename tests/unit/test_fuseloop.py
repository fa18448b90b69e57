"""The request loop, over a SOCK_SEQPACKET pair standing in for /dev/fuse (one request per
read, one reply per write): it answers queued requests without parking in trio, parks when
nothing comes, lets other tasks run, answers an abort's write only after the invalidation
while answering the rest meanwhile, and ends on terminate() or when the fd goes away."""

import errno
import os
import socket
import struct
import threading

import pyfuse3
import pytest
import trio

from khofs import fuse, fuseloop
from test_fuse_requests import out, req  # noqa: F401 (shared request builders)
from khofs.host import Host
from khofs.kernel.machine import MachineConfig


@pytest.fixture
def dev(monkeypatch):
    """(loop, kernel side socket, parks, checkpoints, host)."""
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    host = Host.boot("kho=on reserve_mem=4M:4096:oops", MachineConfig())
    kf = fuse.KhoFuse(host.tree)
    parks, checkpoints = [], []
    real_wait, real_checkpoint = trio.lowlevel.wait_readable, trio.lowlevel.checkpoint

    sent = []
    real_write = os.write

    def write(fd, data):
        if fd == ours.fileno():
            sent.append(data)
        return real_write(fd, data)

    async def wait_readable(fd):
        parks.append((fd, len(sent)))
        await real_wait(fd)

    async def checkpoint():
        checkpoints.append(1)
        await real_checkpoint()
    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(trio.lowlevel, "wait_readable", wait_readable)
    monkeypatch.setattr(trio.lowlevel, "checkpoint", checkpoint)
    monkeypatch.setattr(pyfuse3, "terminate", lambda: trio.lowlevel.notify_closing(ours.fileno()))
    loop = fuseloop.Loop(ours.fileno(), kf)
    yield loop, kernel, parks, checkpoints, host
    ours.close()
    kernel.close()


def lookup_kho(unique):
    return bytes(req(fuse.LOOKUP, 1, b"kho\0", unique=unique)[0])


def replies(kernel, n):
    return [out(kernel.recv(1 << 16)) for _ in range(n)]


def test_queued_requests_are_answered_without_parking(dev):
    loop, kernel, parks, _, _ = dev
    ours = loop.fd
    for u in range(1, 4):
        kernel.send(lookup_kho(u))

    async def main():
        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                n.start_soon(loop.run)
                got = await trio.to_thread.run_sync(replies, kernel, 3)
                assert [(e, u) for e, u, _ in got] == [(0, 1), (0, 2), (0, 3)]
                kernel.shutdown(socket.SHUT_WR)     # the fd goes away: the loop ends
    trio.run(main)
    assert parks == [(ours, 3)]        # parked once, after answering all three


def test_other_tasks_run_during_a_long_run_of_requests(dev):
    loop, kernel, _, checkpoints, _ = dev
    total = 2 * fuseloop.YIELD_EVERY + 1
    for u in range(total):
        kernel.send(lookup_kho(u))
    kernel.shutdown(socket.SHUT_WR)
    trio.run(loop.run)
    assert len(replies(kernel, total)) == total
    assert len(checkpoints) == 2


def test_abort_write_is_answered_after_invalidation_and_others_meanwhile(dev, monkeypatch):
    loop, kernel, _, _, host = dev
    release, invalidated = threading.Event(), []

    def invalidate(entries):
        assert release.wait(10)
        invalidated.append(entries)
    monkeypatch.setattr(fuse, "invalidate", invalidate)
    fin = host.tree.finalize
    kf = loop.server
    fh = struct.unpack("<QIi", out(kf.handle(*req(fuse.OPEN, fin.ino, bytes(8))))[2])[0]
    assert out(kf.handle(*req(fuse.WRITE, fin.ino, struct.pack("<QQIIQII", fh, 0, 2, 0, 0, 0, 0) + b"1\n")))[0] == 0
    abort = req(fuse.WRITE, fin.ino, struct.pack("<QQIIQII", fh, 0, 2, 0, 0, 0, 0) + b"0\n", unique=50)[0]

    async def main():
        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                n.start_soon(loop.run)
                kernel.send(bytes(abort))
                kernel.send(lookup_kho(51))
                first = await trio.to_thread.run_sync(replies, kernel, 1)
                assert [u for _, u, _ in first] == [51] and invalidated == []
                release.set()
                second = await trio.to_thread.run_sync(replies, kernel, 1)
                assert second == [(0, 50, struct.pack("<II", 2, 0))]
                assert len(invalidated[0]) == 2
                loop.terminate()
    trio.run(main)


def test_terminate_ends_a_parked_loop(dev):
    loop, _, parks, _, _ = dev

    async def main():
        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                n.start_soon(loop.run)
                while not parks:
                    await trio.sleep(0.001)
                loop.terminate()
    trio.run(main)
    assert loop.stopping


def test_refused_reply_of_an_open_drops_the_handle(dev, monkeypatch):
    loop, _, _, _, host = dev
    reply = loop.server.handle(*req(fuse.OPEN, host.tree.finalize.ino, bytes(8), unique=9))
    fh = struct.unpack_from("<Q", reply, 16)[0]

    def refused(fd, data):
        raise OSError(errno.ENOENT, "interrupted")
    monkeypatch.setattr(os, "write", refused)
    loop.send(reply)
    assert fh not in loop.server.handles


def test_take_over_lets_init_through_then_runs_the_loop(dev, monkeypatch):
    loop, kernel, _, _, _ = dev
    calls = []

    async def orig():
        calls.append("libfuse reads INIT")
        return True
    monkeypatch.setattr(pyfuse3, "_wait_fuse_readable", orig)
    mine = fuseloop.take_over(loop.server, loop.fd)
    kernel.send(lookup_kho(3))
    kernel.shutdown(socket.SHUT_WR)

    async def main():
        return [await pyfuse3._wait_fuse_readable(), await pyfuse3._wait_fuse_readable()]
    assert trio.run(main) == [True, False]
    assert calls == ["libfuse reads INIT"] and replies(kernel, 1)[0][:2] == (0, 3)
    assert mine.server is loop.server
    fuseloop.uninstall()
    assert pyfuse3._wait_fuse_readable is orig


def test_take_over_refuses_a_pyfuse3_without_the_hook(dev, monkeypatch):
    loop = dev[0]
    monkeypatch.delattr(pyfuse3, "_wait_fuse_readable")
    with pytest.raises(RuntimeError, match="pyfuse3"):
        fuseloop.take_over(loop.server, loop.fd)


def test_debug_logs_each_request(dev, capsys):
    loop, kernel, _, _, _ = dev
    loop.debug = True
    kernel.send(lookup_kho(4))
    kernel.send(bytes(req(999, 1, unique=5)[0]))
    kernel.shutdown(socket.SHUT_WR)
    trio.run(loop.run)
    err = capsys.readouterr().err
    assert "unique 4 LOOKUP nodeid 1: 128 bytes" in err
    assert "unique 5 999 nodeid 1: error 38" in err
