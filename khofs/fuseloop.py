"""A quicker wait for /dev/fuse in pyfuse3's request loop.

pyfuse3's workers park in trio's epoll before every request, so each request pays a full
scheduler round trip. An open + read + close is four requests that follow each other within
microseconds; polling the fd for up to 100 us before parking catches most of them.

One worker at a time is the reader: only it polls or parks on the fd, and whoever returns
True reads the request at once (pyfuse3 does not yield in between), so no worker is left
reading an empty fd. The reader keeps the role until its handler has to wait for something
(lend_reader()); the other worker then takes over, so requests keep being answered. When
the fd reports the unmount, or pyfuse3.terminate() closes it, every worker ends.
"""

import inspect
import select
import time

import pyfuse3
import trio

SPIN_SECONDS = 100e-6     # how long to poll before parking in trio
YIELD_EVERY = 128         # let other trio tasks (the control socket) run at least this often

_GONE = select.POLLERR | select.POLLHUP | select.POLLNVAL
_state = {"lend": None}


def _make_wait(fd: int):
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    lot = trio.lowlevel.ParkingLot()     # workers that are not the reader
    state = {"reader": None, "fast": 0, "closed": False}

    def lend():
        if state["reader"] is trio.lowlevel.current_task():
            state["reader"] = None
            lot.unpark()

    async def wait_fuse_readable():
        me = trio.lowlevel.current_task()
        while state["reader"] not in (None, me) and not state["closed"]:
            await lot.park()
        state["reader"] = me
        while not state["closed"]:
            if state["fast"] < YIELD_EVERY:
                deadline = time.perf_counter() + SPIN_SECONDS
                while True:
                    ready = poller.poll(0)
                    if ready:
                        if ready[0][1] & _GONE:
                            # Unmounted: this worker reads the error and ends; so do the rest.
                            state["closed"] = True
                            lot.unpark_all()
                        state["fast"] += 1
                        return True
                    if time.perf_counter() >= deadline:
                        break
            state["fast"] = 0
            try:
                await trio.lowlevel.wait_readable(fd)
            except trio.ClosedResourceError:
                # pyfuse3.terminate(): this and every later wait ends its worker.
                state["closed"] = True
                lot.unpark_all()
        return False

    wait_fuse_readable.orig = pyfuse3._wait_fuse_readable
    wait_fuse_readable.lend = lend
    return wait_fuse_readable


def install(fd: int) -> bool:
    """Use the quicker wait for the session whose /dev/fuse fd is `fd`. pyfuse3 3.x looks
    the wait up by this module-level name on each request; elsewhere nothing changes."""
    if not inspect.iscoroutinefunction(getattr(pyfuse3, "_wait_fuse_readable", None)):
        return False
    wait = _make_wait(fd)
    pyfuse3._wait_fuse_readable = wait
    _state["lend"] = wait.lend
    return True


def uninstall() -> None:
    cur = pyfuse3._wait_fuse_readable
    if hasattr(cur, "orig"):
        pyfuse3._wait_fuse_readable = cur.orig
    _state["lend"] = None


def lend_reader() -> None:
    """Called by a handler about to wait: another worker reads /dev/fuse meanwhile."""
    if _state["lend"] is not None:
        _state["lend"]()
