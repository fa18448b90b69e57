"""The khofs daemon: the emulated kernel behind a FUSE mount, until unmounted or signalled."""

import errno
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import traceback

import pyfuse3
import trio

from .. import runtime
from . import control
from ..fs.debugfs import Tree
from ..fs.fuse import KhoOperations
from .host import Host


SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _held(signum, frame) -> None:
    """What SIGNALS do outside the daemon's receiver: nothing (a teardown is under way)."""


def hold_signals() -> None:
    """From here on, SIGNALS never take their default action: blocked on this thread (so one
    that arrives before the daemon's receiver waits for it) and, on any other thread, a
    handler that does nothing. A handler, not SIG_IGN, which would drop a pending one; and
    the receiver puts it back when it closes, so a signal during teardown cannot kill."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    for sig in SIGNALS:
        signal.signal(sig, _held)


def log(text: str) -> None:
    """One line to the daemon's log (its stderr)."""
    print(text, file=sys.stderr, flush=True)


def sd_notify(message: str) -> bool:
    """sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET, if set."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr or not (addr.startswith("/") or addr.startswith("@")):
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(addr)
            s.sendall(message.encode())
        except OSError as e:
            log(f"khofs: cannot notify the service manager: {e}")
            return False
    return True


class Daemon:
    """One trio.run: pyfuse3's workers, the control server and the signal receiver in one
    nursery. The emulated kernel is touched on this one thread only; handlers that await
    (an invalidation in a thread) do so after their change to it is complete."""

    def __init__(self, mountpoint: str, host: Host, stat_size: str = "content",
                 fuse_options=(), debug_fuse: bool = False, cache: str = "direct"):
        self.mountpoint = mountpoint          # absolute and resolved by the caller
        self.host = host
        self.ops = KhoOperations(Tree(host.machine), stat_size, cache=cache, debug=debug_fuse)
        host.on_boot.append(self.ops.new_boot)
        self.control = control.Control(host)
        self.sock_path = runtime.paths(mountpoint)["sock"]
        # default_permissions: the kernel checks modes, as it does on debugfs.
        self.options = set(pyfuse3.default_options) | {"fsname=khofs", "subtype=khofs"}
        self.options |= set(fuse_options)
        if debug_fuse:
            self.options.add("debug")     # libfuse logs INIT and every request it reads
        self._mounted = False
        self.stopping = False
        self.ready = False
        self.signalled = 0

    def mount(self) -> None:
        """Mount the FUSE file system (pyfuse3.init); the kernel starts sending requests."""
        pyfuse3.init(self.ops, self.mountpoint, sorted(self.options))
        self._mounted = True

    async def control_request(self, line: bytes) -> dict:
        """Run one control request; before its reply, the kernel forgets what it removed
        (an abort's files, everything of an old boot after a kexec or a reboot)."""
        if self.stopping:
            return {"ok": False, "errno": errno.ESHUTDOWN, "error": "ESHUTDOWN",
                    "message": "the daemon is unmounting"}
        boots = self.host.boots
        reply = self.control.handle_line(line)
        try:
            await self.ops.settle()
        except Exception:
            log(f"khofs: internal error after a control request:\n{traceback.format_exc()}")
        if self.host.boots != boots:
            # A dead boot's machine and tree hold reference cycles: free them now rather than
            # let them pile up until the collector runs by itself.
            gc.collect()
        return reply

    async def _signals(self, task_status=trio.TASK_STATUS_IGNORED):
        # Every signal, however many and whenever, leads to the one teardown: they are held
        # (hold_signals) from start-up until this receiver runs, and again from when it
        # stops, so none can take its default action half way through an unmount.
        try:
            with trio.open_signal_receiver(*SIGNALS) as sigs:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
                task_status.started()
                async for sig in sigs:
                    if not self.signalled:
                        self.signalled = sig
                    self.ops.held_lock.stop()     # sleepers on a held kho_out.lock get EIO
                    pyfuse3.terminate()
        finally:
            signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
            # trio closes its wakeup socket before it unhooks it: a signal in between would
            # be written to a closed (or reused) descriptor. Nothing needs waking now.
            signal.set_wakeup_fd(-1)

    async def _ready(self, on_ready):
        # The mount answers once the kernel's GETATTR of its root comes back. The stat runs in
        # a child process: a thread of ours blocked in a request to ourselves kept a daemon
        # SIGKILLed during start-up from ever exiting; a child's stat ends with the connection.
        await trio.run_process(["stat", "--", self.mountpoint], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL)
        self.ready = True
        if on_ready:
            on_ready()
        sd_notify(f"READY=1\nMAINPID={os.getpid()}")

    async def _main(self, on_ready):
        async with trio.open_nursery() as nursery:
            await nursery.start(self._signals)
            await nursery.start(control.serve, self.sock_path, self.control_request)
            nursery.start_soon(self._ready, on_ready)
            await pyfuse3.main()
            self.stopping = True
            if self.signalled:
                log(f"khofs: signal {self.signalled}: unmounting")
            sd_notify("STOPPING=1")
            nursery.cancel_scope.cancel()

    def run(self, on_ready=None) -> None:
        """Serve until unmounted or signalled, then close the session. Signals stay held
        afterwards: the teardown below and the caller's own runs to its end."""
        hold_signals()
        try:
            trio.run(self._main, on_ready)
        finally:
            hold_signals()
            if self._mounted:
                pyfuse3.close(unmount=True)
                self._mounted = False
            try:
                os.unlink(self.sock_path)
            except FileNotFoundError:
                pass
            runtime.remove_info(self.mountpoint)
            # Unmounted: a signal has nothing left to stop. Ignored, not held, because
            # the interpreter's exit puts the default action back on handlers it set.
            sys.unraisablehook = _quiet_signal_race
            for sig in SIGNALS:
                signal.signal(sig, signal.SIG_IGN)


def _quiet_signal_race(unraisable, _default=sys.unraisablehook) -> None:
    # A signal that came just before SIG_IGN reaches the interpreter just after it, which
    # says so as an unraisable error; that signal is one the teardown ignores anyway.
    e = unraisable.exc_value
    if not (isinstance(e, OSError) and str(e).endswith("ignored due to race condition")):
        _default(unraisable)


def report(fd: int | None, **msg) -> None:
    """A line to the `khofs mount` parent waiting on the readiness pipe."""
    if fd is not None:
        os.write(fd, (json.dumps(msg) + "\n").encode())
