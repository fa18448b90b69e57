"""The request loop: reads /dev/fuse and answers with khofs.fuse.KhoFuse, inside pyfuse3.main().

pyfuse3 answers INIT (libfuse negotiates the connection as for any pyfuse3 filesystem) and
then awaits its module-level _wait_fuse_readable() before each request. The wait installed
here lets that first request through, then runs this loop until the unmount and returns
False, which ends pyfuse3's own loop.

The loop reads without parking in trio while requests keep coming: after an answer it polls
the fd for up to 100 us, yielding the CPU between polls so a client on this CPU runs first,
and parks only when nothing came (and at least every 128 requests, so the control socket
runs). A write that removed files (an abort) is answered from a task once the kernel forgot
them, while the loop goes on answering the kernel.
"""

import errno
import inspect
import os
import sys
import time

import pyfuse3
import trio

from . import fuse

SPIN_SECONDS = 100e-6     # how long to poll before parking in trio
YIELD_EVERY = 128         # let other trio tasks run at least this often
# libfuse's buffer: the kernel refuses reads into less than a whole request (max_write 1 MiB).
BUFSIZE = 256 * 4096 + 4096

class Loop:
    def __init__(self, fd: int, server: "fuse.KhoFuse", debug: bool = False):
        self.fd, self.server, self.debug = fd, server, debug
        self.stopping = False
        self.waiting = 0        # answers waiting for an invalidation

    def terminate(self) -> None:
        """End the loop (from the trio thread); pyfuse3.terminate() wakes it if parked."""
        self.stopping = True
        pyfuse3.terminate()

    def _read(self, buf):
        """One request's length, or None if none came while polling."""
        fd, readv = self.fd, os.readv
        try:
            return readv(fd, [buf])
        except BlockingIOError:
            if self.waiting:
                return None     # park at once: trio then runs the waiting answers
        perf_counter, sched_yield = time.perf_counter, os.sched_yield
        deadline = perf_counter() + SPIN_SECONDS
        while perf_counter() < deadline:
            sched_yield()
            try:
                return readv(fd, [buf])
            except BlockingIOError:
                continue
        return None

    def send(self, reply: bytes) -> None:
        try:
            os.write(self.fd, reply)
        except OSError as e:
            self._refused(e, reply)

    def _refused(self, e: OSError, reply: bytes) -> None:
        unique = fuse.OUT_HEADER.unpack_from(reply)[2]
        if e.errno == errno.ENOENT:
            self.server.dropped(unique)     # the request was interrupted meanwhile
        elif e.errno != errno.ENODEV:       # ENODEV: unmounted
            print(f"khofs: reply to request {unique} refused: {e}", file=sys.stderr,
                  flush=True)

    async def _answer_later(self, unique, reply, removed) -> None:
        # Abandoned if the loop ends: the kernel no longer waits for the answer.
        self.waiting += 1
        try:
            await trio.to_thread.run_sync(fuse.invalidate, removed, abandon_on_cancel=True)
            self.send(reply)
        finally:
            self.waiting -= 1

    def _log(self, buf, reply) -> None:
        _, opcode, unique, nodeid = fuse.IN_HEADER.unpack_from(buf)[:4]
        name = fuse.OPCODE_NAMES.get(opcode, str(opcode))
        if reply is None:
            out = "deferred" if self.server.deferred else "no reply"
        else:
            length, err = fuse.OUT_HEADER.unpack_from(reply)[:2]
            out = f"error {-err}" if err else f"{length - 16} bytes"
        print(f"khofs: fuse: unique {unique} {name} nodeid {nodeid}: {out}",
              file=sys.stderr, flush=True)

    async def run(self) -> None:
        fd, server = self.fd, self.server
        handle, write = server.handle, os.write
        os.set_blocking(fd, False)
        buf = bytearray(BUFSIZE)
        quick = 0
        async with trio.open_nursery() as nursery:
            while not self.stopping:
                try:
                    n = self._read(buf)
                except InterruptedError:
                    continue
                except OSError as e:
                    if e.errno == errno.ENOENT:     # the request was interrupted before we read it
                        continue
                    if e.errno == errno.ENODEV:     # unmounted
                        break
                    raise
                if n is None:
                    quick = 0
                    try:
                        await trio.lowlevel.wait_readable(fd)
                    except trio.ClosedResourceError:    # pyfuse3.terminate()
                        break
                    continue
                if n < fuse.HDR:        # 0: the fd was closed under us
                    break
                reply = handle(buf, n)
                if self.debug:
                    self._log(buf, reply)
                if reply is not None:
                    try:
                        write(fd, reply)
                    except OSError as e:
                        self._refused(e, reply)
                while server.deferred:
                    nursery.start_soon(self._answer_later, *server.deferred.pop(0))
                quick += 1
                if quick >= YIELD_EVERY:
                    quick = 0
                    await trio.lowlevel.checkpoint()
            nursery.cancel_scope.cancel()


def take_over(server: "fuse.KhoFuse", fd: int, debug: bool = False) -> Loop:
    """Answer every request after INIT on `fd` (pyfuse3's session fd) with `server`."""
    orig = getattr(pyfuse3, "_wait_fuse_readable", None)
    if not inspect.iscoroutinefunction(orig):
        raise RuntimeError("khofs needs pyfuse3 3.4 or later 3.x: this one has no "
                           "_wait_fuse_readable to hook its request loop into")
    loop = Loop(fd, server, debug)
    first = [True]

    async def wait_fuse_readable():
        if first[0]:
            first[0] = False
            return await orig()         # INIT: read and answered by libfuse
        await loop.run()
        return False

    wait_fuse_readable.orig = orig
    pyfuse3._wait_fuse_readable = wait_fuse_readable
    return loop


def uninstall() -> None:
    cur = pyfuse3._wait_fuse_readable
    if hasattr(cur, "orig"):
        pyfuse3._wait_fuse_readable = cur.orig
