"""The quicker /dev/fuse wait: takes a queued request without parking in trio, parks often
enough for other tasks and whenever nothing is queued, never hands two workers one request,
lets another worker in while a handler waits, and ends every worker after
pyfuse3.terminate() or when the fd goes away."""

import os

import pyfuse3
import pytest
import trio

from khofs import fuseloop


@pytest.fixture
def pipe(monkeypatch):
    r, w = os.pipe()
    os.set_blocking(r, False)
    parked = []
    real = trio.lowlevel.wait_readable

    async def wait_readable(fd):
        parked.append(fd)
        await real(fd)
    monkeypatch.setattr(trio.lowlevel, "wait_readable", wait_readable)
    orig = pyfuse3._wait_fuse_readable
    fuseloop.install(r)
    yield r, w, parked
    fuseloop.uninstall()
    assert pyfuse3._wait_fuse_readable is orig
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass                # a test closed it


def waits(n):
    async def main():
        return [await pyfuse3._wait_fuse_readable() for _ in range(n)]
    return trio.run(main)


def test_queued_request_is_taken_without_parking(pipe):
    _r, w, parked = pipe
    os.write(w, b"x")
    assert waits(fuseloop.YIELD_EVERY) == [True] * fuseloop.YIELD_EVERY
    assert parked == []


def test_parks_after_a_run_of_quick_requests(pipe):
    _r, w, parked = pipe
    os.write(w, b"x")
    assert all(waits(fuseloop.YIELD_EVERY + 1))
    assert len(parked) == 1


def test_parks_when_nothing_is_queued(pipe):
    r, w, parked = pipe

    async def main():
        async with trio.open_nursery() as n:
            async def later():
                await trio.sleep(0.05)
                os.write(w, b"x")
            n.start_soon(later)
            return await pyfuse3._wait_fuse_readable()
    assert trio.run(main) is True
    assert parked == [r]


def test_two_workers_never_get_one_request(pipe):
    r, w, _parked = pipe
    taken, empty = [], []

    async def worker(name):
        while await pyfuse3._wait_fuse_readable():
            try:
                os.read(r, 1)           # what pyfuse3 does at once after True
                taken.append(name)
            except BlockingIOError:
                empty.append(name)
            await trio.sleep(0)

    async def main():
        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                n.start_soon(worker, "a")
                n.start_soon(worker, "b")
                for _ in range(20):
                    os.write(w, b"x")
                    await trio.sleep(0.001)
                await trio.sleep(0.05)
                trio.lowlevel.notify_closing(r)     # what pyfuse3.terminate() does
    trio.run(main)
    assert len(taken) == 20 and empty == []


def test_a_waiting_handler_lets_another_worker_answer(pipe):
    # A handler that waits (for an invalidation) lets the other worker take the next
    # request while the first is still waiting.
    r, w, _parked = pipe
    log = []
    release = trio.Event()

    async def worker(name):
        while await pyfuse3._wait_fuse_readable():
            data = os.read(r, 1)
            log.append((name, data))
            if data == b"w":                    # the abort's write: wait for the thread
                fuseloop.lend_reader()
                await release.wait()
                log.append((name, "answered"))

    async def main():
        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                n.start_soon(worker, "a")
                await trio.sleep(0.01)
                n.start_soon(worker, "b")
                os.write(w, b"w")
                await trio.sleep(0.05)
                os.write(w, b"x")               # must be answered while "w" still waits
                await trio.sleep(0.05)
                release.set()
                await trio.sleep(0.05)
                trio.lowlevel.notify_closing(r)
    trio.run(main)
    assert log == [("a", b"w"), ("b", b"x"), ("a", "answered")]


def test_second_worker_ends_when_the_first_ends_on_a_dead_fd(pipe):
    # An unmount: the fd reports an error, the reader's session loop reads it and ends; the
    # other worker must then see it too instead of waiting forever.
    r, w, _parked = pipe
    ended = []

    async def worker(name):
        while await pyfuse3._wait_fuse_readable():
            if os.read(r, 1) == b"":            # EOF: pyfuse3 reads 0 and ends the loop
                break
        ended.append(name)

    async def main():
        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                n.start_soon(worker, "a")
                n.start_soon(worker, "b")
                await trio.sleep(0.01)
                os.close(w)
    trio.run(main)
    assert sorted(ended) == ["a", "b"]
