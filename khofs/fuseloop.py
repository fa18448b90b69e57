"""The daemon's loop: reads /dev/fuse and answers with khofs.fuse.KhoFuse, and runs what other
threads hand it (control requests, answers that waited for an invalidation).

The loop reads without sleeping while requests keep coming: after an answer it polls the fd
for up to 100 us, yielding the CPU between polls so a client on this CPU runs first, and
sleeps in epoll only when nothing came (and looks at other threads' work at least every
128 requests). The kernel's state is touched only on this thread.
"""

import collections
import errno
import io
import os
import select
import signal
import sys
import threading
import time

from . import fuse
from .libfuse import BUFSIZE

SPIN_SECONDS = 100e-6     # how long to poll before sleeping
YIELD_EVERY = 128         # run other threads' work at least this often
DRAIN_SECONDS = 5.0       # the longest the loop answers after terminate() for invalidations


class LoopStopped(Exception):
    """The loop ended before it ran the call."""


class Loop:
    def __init__(self, fd: int, server: "fuse.KhoFuse", invalidate, debug: bool = False):
        """`invalidate(entries)` makes the kernel forget removed entries; it may block until
        this loop answers a request, so it runs in another thread."""
        self.fd, self.server, self.invalidate, self.debug = fd, server, invalidate, debug
        self.stopping = False
        self.waiting = 0        # answers waiting for an invalidation
        self.pending = lambda: 0    # other invalidations in flight (the session's count)
        self._drain_deadline = None
        self._on_signals = False
        self._calls = collections.deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poll = select.epoll(2)
        self._poll.register(fd, select.EPOLLIN)
        self._poll.register(self._wake_r, select.EPOLLIN)

    # -- from any thread ---------------------------------------------------------------
    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass            # already awake

    def submit(self, fn, *args) -> None:
        """Run fn(*args) on the loop's thread."""
        self._calls.append((fn, args))
        self.wake()

    def call(self, fn, *args):
        """Run fn(*args) on the loop's thread and return what it returns (or raise what it
        raised). Raises LoopStopped if the loop is ending and fn has not started; once
        started, fn runs to the end and its result is returned."""
        done, box, lock, state = threading.Event(), [], threading.Lock(), {}

        def run():
            with lock:
                if state.get("cancelled"):
                    return
                state["started"] = True
            try:
                box.append((True, fn(*args)))
            except BaseException as e:
                box.append((False, e))
            done.set()
        self.submit(run)
        while not done.wait(0.05 if self.stopping else 0.5):
            if self.stopping:
                with lock:
                    if not state.get("started"):
                        state["cancelled"] = True
                        raise LoopStopped()
        ok, value = box[0]
        if ok:
            return value
        raise value

    def terminate(self) -> None:
        """End the loop (from a signal handler or another thread)."""
        self.stopping = True
        self.wake()

    def wake_on_signals(self) -> None:
        """A signal arriving while the loop sleeps wakes it (its handler runs at once)."""
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self._on_signals = True

    def close(self) -> None:
        if self._on_signals:
            signal.set_wakeup_fd(-1)
        self._poll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- on the loop's thread --------------------------------------------------------------
    def _spin(self, readinto, buf):
        """After a read found nothing: one request's length, or None if none came while
        polling."""
        if self.waiting or self._calls:
            return None     # sleep at once: other threads' work is due
        perf_counter, sched_yield = time.perf_counter, os.sched_yield
        deadline = perf_counter() + SPIN_SECONDS
        while perf_counter() < deadline:
            sched_yield()
            n = readinto(buf)
            if n is not None:
                return n
        return None

    def _park(self, timeout: float = -1) -> None:
        """Sleep until the fd is readable or work is handed over; run that work."""
        if self._calls:
            timeout = 0
        for fd, _ in self._poll.poll(timeout):
            if fd == self._wake_r:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
        calls = self._calls
        while calls:
            fn, args = calls.popleft()
            fn(*args)

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

    def _answer_later(self, unique, reply, removed) -> None:
        self.waiting += 1

        def work():
            try:
                self.invalidate(removed)
            finally:
                self.submit(self._answered, reply)
        threading.Thread(target=work, name=f"khofs-answer-{unique}", daemon=True).start()

    def _answered(self, reply) -> None:
        self.waiting -= 1
        self.send(reply)

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

    def _drained(self) -> bool:
        """After terminate(): whether to stop now. The kernel may still need answers for
        an invalidation in flight to finish (a request holding a lock it waits for), so
        the loop goes on answering until none is left, or DRAIN_SECONDS have passed."""
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + DRAIN_SECONDS
        return not (self.waiting or self.pending()) or time.monotonic() > self._drain_deadline

    def run(self) -> None:
        """Answer requests until terminate() (then drained), the unmount, or the fd's end."""
        fd, server = self.fd, self.server
        handle, write = server.handle, os.write
        os.set_blocking(fd, False)
        # A raw file's readinto() answers None where the fd has nothing (EAGAIN): no
        # exception to raise and catch between requests.
        readinto = io.FileIO(fd, "r", closefd=False).readinto
        buf = bytearray(BUFSIZE)
        quick = 0
        try:
            while not (self.stopping and self._drained()):
                try:
                    n = readinto(buf)
                    if n is None:
                        n = self._spin(readinto, buf)
                except OSError as e:
                    if e.errno == errno.ENOENT:     # the request was interrupted before we read it
                        continue
                    if e.errno == errno.ENODEV:     # unmounted
                        break
                    raise
                if n is None:
                    quick = 0
                    self._park(0.05 if self.stopping else -1)
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
                    self._answer_later(*server.deferred.pop(0))
                quick += 1
                if quick >= YIELD_EVERY:
                    quick = 0
                    self._park(0)
        finally:
            self.stopping = True
