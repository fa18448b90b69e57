"""A quicker wait for /dev/fuse in pyfuse3's request loop.

pyfuse3's worker parks in trio's epoll before every request, so each request pays a full
scheduler round trip. An open + read + close is four requests that follow each other within
microseconds; polling the fd for up to 100 us before parking catches most of them. The
daemon runs a single worker (max_tasks=1), so nobody else reads /dev/fuse between the poll
and the read.
"""

import select
import time

import pyfuse3
import trio

SPIN_SECONDS = 100e-6     # how long to poll before parking in trio
YIELD_EVERY = 128         # let other trio tasks (the control socket) run at least this often

_state = {"fast": 0}


def _make_wait(fd: int):
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    orig = pyfuse3._wait_fuse_readable

    async def wait_fuse_readable():
        if _state["fast"] < YIELD_EVERY:
            deadline = time.perf_counter() + SPIN_SECONDS
            while True:
                if poller.poll(0):
                    _state["fast"] += 1
                    return True
                if time.perf_counter() >= deadline:
                    break
        _state["fast"] = 0
        return await orig()

    wait_fuse_readable.orig = orig
    return wait_fuse_readable


def install(fd: int) -> None:
    """Use the quicker wait for the session whose /dev/fuse fd is `fd`."""
    _state["fast"] = 0
    pyfuse3._wait_fuse_readable = _make_wait(fd)


def uninstall() -> None:
    cur = pyfuse3._wait_fuse_readable
    if hasattr(cur, "orig"):
        pyfuse3._wait_fuse_readable = cur.orig
