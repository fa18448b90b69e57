"""The request loop, over a SOCK_SEQPACKET pair standing in for /dev/fuse (one request per
read, one reply per write): it answers queued requests without sleeping, sleeps when nothing
comes, runs other threads' work between requests, answers an abort's write only after the
invalidation while answering the rest meanwhile, and ends on terminate() or when the fd
goes away."""

import errno
import os
import signal
import socket
import struct
import threading
import time

import pytest

from khofs import fuse, fuseloop
from test_fuse_requests import out, req
from khofs.host import Host
from khofs.kernel.machine import MachineConfig


@pytest.fixture
def dev(monkeypatch):
    """(loop, kernel side socket, parks, host); parks records (timeout, replies sent)."""
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    host = Host.boot("kho=on reserve_mem=4M:4096:oops", MachineConfig())
    kf = fuse.KhoFuse(host.tree)
    loop = fuseloop.Loop(ours.fileno(), kf, lambda entries: None)
    parks, sent = [], []
    real_write, real_park = os.write, loop._park

    def write(fd, data):
        if fd == ours.fileno():
            sent.append(data)
        return real_write(fd, data)

    def park(timeout=-1):
        parks.append((timeout, len(sent)))
        real_park(timeout)
    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(loop, "_park", park)
    yield loop, kernel, parks, host
    loop.close()
    ours.close()
    kernel.close()


def lookup_kho(unique):
    return bytes(req(fuse.LOOKUP, 1, b"kho\0", unique=unique)[0])


def replies(kernel, n):
    kernel.settimeout(10)
    return [out(kernel.recv(1 << 16)) for _ in range(n)]


def first_park(parks):
    deadline = time.monotonic() + 10
    while not parks:
        assert time.monotonic() < deadline, "the loop never slept"
        time.sleep(0.001)
    return parks[0]


def running(loop):
    t = threading.Thread(target=loop.run, daemon=True)
    t.start()
    return t


def test_queued_requests_are_answered_without_sleeping(dev):
    loop, kernel, parks, _ = dev
    for u in range(1, 4):
        kernel.send(lookup_kho(u))
    t = running(loop)
    assert [(e, u) for e, u, _ in replies(kernel, 3)] == [(0, 1), (0, 2), (0, 3)]
    assert first_park(parks) == (-1, 3)     # slept first after answering all three
    kernel.shutdown(socket.SHUT_WR)     # the fd goes away: the loop ends
    t.join(10)
    assert not t.is_alive()


def test_other_threads_work_runs_during_a_long_run_of_requests(dev, monkeypatch):
    loop, kernel, parks, _ = dev
    monkeypatch.setattr(fuseloop, "YIELD_EVERY", 4)     # the requests fit the socket's buffer
    total = 2 * fuseloop.YIELD_EVERY + 1
    for u in range(total):
        kernel.send(lookup_kho(u))
    kernel.shutdown(socket.SHUT_WR)
    loop.run()
    assert len(replies(kernel, total)) == total
    assert [p for p in parks if p[0] == 0] == [(0, fuseloop.YIELD_EVERY),
                                               (0, 2 * fuseloop.YIELD_EVERY)]


def test_call_runs_on_the_loop_thread_and_returns_or_raises(dev):
    loop, kernel, _, _ = dev
    t = running(loop)
    assert loop.call(threading.current_thread) is t
    with pytest.raises(ZeroDivisionError):
        loop.call(lambda: 1 / 0)
    kernel.send(lookup_kho(5))          # and the loop still answers
    assert replies(kernel, 1)[0][:2] == (0, 5)
    loop.terminate()
    t.join(10)
    with pytest.raises(fuseloop.LoopStopped):
        loop.call(lambda: None)


def test_abort_write_is_answered_after_invalidation_and_others_meanwhile(dev):
    loop, kernel, _, host = dev
    release, invalidated = threading.Event(), []

    def invalidate(entries):
        assert release.wait(10)
        invalidated.append(entries)
    loop.invalidate = invalidate
    fin = host.tree.finalize
    kf = loop.server
    fh = struct.unpack("<QIi", out(kf.handle(*req(fuse.OPEN, fin.ino, bytes(8))))[2])[0]
    assert out(kf.handle(*req(fuse.WRITE, fin.ino, struct.pack("<QQIIQII", fh, 0, 2, 0, 0, 0, 0) + b"1\n")))[0] == 0
    abort = req(fuse.WRITE, fin.ino, struct.pack("<QQIIQII", fh, 0, 2, 0, 0, 0, 0) + b"0\n", unique=50)[0]
    t = running(loop)
    kernel.send(bytes(abort))
    kernel.send(lookup_kho(51))
    assert [u for _, u, _ in replies(kernel, 1)] == [51] and invalidated == []
    release.set()
    assert replies(kernel, 1) == [(0, 50, struct.pack("<II", 2, 0))]
    assert len(invalidated[0]) == 2
    assert loop.waiting == 0
    loop.terminate()
    t.join(10)
    assert not t.is_alive()


def test_terminate_ends_a_sleeping_loop(dev):
    loop, _, parks, _ = dev
    t = running(loop)
    first_park(parks)
    loop.terminate()
    t.join(10)
    assert not t.is_alive() and loop.stopping


def test_a_signal_wakes_a_sleeping_loop(dev):
    loop, _, parks, _ = dev
    got = []

    def handler(sig, frame):
        got.append(sig)
        loop.terminate()
    old = signal.signal(signal.SIGUSR1, handler)
    loop.wake_on_signals()
    try:
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        loop.run()                      # on the main thread, as in the daemon
    finally:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGUSR1, old)
    assert got == [signal.SIGUSR1] and parks


def test_refused_reply_of_an_open_drops_the_handle(dev, monkeypatch):
    loop, _, _, host = dev
    reply = loop.server.handle(*req(fuse.OPEN, host.tree.finalize.ino, bytes(8), unique=9))
    fh = struct.unpack_from("<Q", reply, 16)[0]

    def refused(fd, data):
        raise OSError(errno.ENOENT, "interrupted")
    monkeypatch.setattr(os, "write", refused)
    loop.send(reply)
    assert fh not in loop.server.handles


def test_debug_logs_each_request(dev, capsys):
    loop, kernel, _, _ = dev
    loop.debug = True
    kernel.send(lookup_kho(4))
    kernel.send(bytes(req(999, 1, unique=5)[0]))
    kernel.shutdown(socket.SHUT_WR)
    loop.run()
    err = capsys.readouterr().err
    assert "unique 4 LOOKUP nodeid 1: 128 bytes" in err
    assert "unique 5 999 nodeid 1: error 38" in err


def test_a_call_that_started_finishes_and_returns_though_the_loop_is_ending(dev):
    loop, _, _, _ = dev
    t = running(loop)
    started, finish = threading.Event(), threading.Event()

    def slow():
        started.set()
        assert finish.wait(10)
        return "done"
    got = []
    caller = threading.Thread(target=lambda: got.append(loop.call(slow)))
    caller.start()
    assert started.wait(10)
    loop.terminate()                    # while slow() runs on the loop's thread
    threading.Event().wait(0.2)
    finish.set()
    caller.join(10)
    t.join(10)
    assert got == ["done"] and not t.is_alive()


def test_terminate_keeps_answering_while_invalidations_are_in_flight(dev):
    loop, kernel, _, _ = dev
    in_flight = [1]
    loop.pending = lambda: in_flight[0]
    t = running(loop)
    loop.terminate()
    kernel.send(lookup_kho(7))          # the request an invalidation waits on
    assert replies(kernel, 1)[0][:2] == (0, 7)
    assert t.is_alive()
    in_flight[0] = 0
    t.join(10)
    assert not t.is_alive()


def test_draining_ends_after_its_deadline(dev, monkeypatch):
    loop, _, _, _ = dev
    monkeypatch.setattr(fuseloop, "DRAIN_SECONDS", 0.2)
    loop.pending = lambda: 1            # never finishes
    loop.terminate()
    t = running(loop)
    t.join(10)
    assert not t.is_alive()
