"""The quicker /dev/fuse wait: takes a queued request without parking in trio, yet parks
often enough for other tasks, and parks whenever nothing is queued."""

import os

import pyfuse3
import pytest
import trio

from khofs import fuseloop


@pytest.fixture
def pipe(monkeypatch):
    r, w = os.pipe()
    parked = []

    async def orig():
        parked.append(1)
        await trio.lowlevel.checkpoint()
        return True
    monkeypatch.setattr(pyfuse3, "_wait_fuse_readable", orig)
    fuseloop.install(r)
    yield w, parked
    fuseloop.uninstall()
    assert pyfuse3._wait_fuse_readable is orig
    os.close(r)
    os.close(w)


def waits(n):
    async def main():
        return [await pyfuse3._wait_fuse_readable() for _ in range(n)]
    return trio.run(main)


def test_queued_request_is_taken_without_parking(pipe):
    w, parked = pipe
    os.write(w, b"x")
    assert waits(fuseloop.YIELD_EVERY) == [True] * fuseloop.YIELD_EVERY
    assert parked == []


def test_parks_after_a_run_of_quick_requests(pipe):
    w, parked = pipe
    os.write(w, b"x")
    assert all(waits(fuseloop.YIELD_EVERY + 1))
    assert parked == [1]


def test_parks_when_nothing_is_queued(pipe):
    _w, parked = pipe
    assert waits(3) == [True] * 3
    assert parked == [1, 1, 1]
