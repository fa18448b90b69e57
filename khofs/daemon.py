"""The khofs daemon: the emulated kernel behind a FUSE mount, until unmounted or signalled."""

import errno
import json
import os
import signal
import socket
import sys
import traceback

from . import control, fuseloop, runtime
from .debugfs import ROOT_INO
from .fuse import KhoFuse, invalidate
from .host import Host
from .libfuse import Session


def log(text: str) -> None:
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
    def __init__(self, mountpoint: str, host: Host, stat_size: str = "content",
                 fuse_options=(), debug_fuse: bool = False):
        self.mountpoint = mountpoint          # absolute and resolved by the caller
        self.host = host
        self.fuse = KhoFuse(host.tree, stat_size, deny_others="allow_root" in fuse_options,
                            owner=os.getuid())
        host.on_new_tree.append(self.fuse.set_tree)
        self.control = control.Control(host)
        self.sock_path = runtime.paths(mountpoint)["sock"]
        # default_permissions: the kernel checks modes, as it does on debugfs.
        self.options = {"default_permissions", "fsname=khofs", "subtype=khofs"}
        self.options |= set(fuse_options)
        self.debug_fuse = debug_fuse
        if debug_fuse:
            self.options.add("debug")     # libfuse logs INIT; khofs.fuseloop the rest
        self.session = None
        self.loop = None
        self.server = None
        self.signalled = 0

    def mount(self) -> None:
        self.session = Session(self.mountpoint, sorted(self.options))
        try:
            self.session.init()
        except BaseException:
            self.session.close()
            self.session = None
            raise
        self.loop = fuseloop.Loop(self.session.fd, self.fuse,
                                  lambda entries: invalidate(self.session, entries),
                                  self.debug_fuse)
        self.loop.pending = self.session.busy

    def _control_request(self, line: bytes) -> dict:
        """In a control connection's thread: the request runs on the loop's thread; then,
        before the reply, the kernel forgets what it removed (an abort's files, an old
        boot's entries after a kexec) while the loop goes on answering it."""
        try:
            reply, stale, removed = self.loop.call(self._execute, line)
        except fuseloop.LoopStopped:
            return {"ok": False, "errno": errno.ESHUTDOWN, "error": "ESHUTDOWN",
                    "message": "the daemon is unmounting"}
        except Exception:
            # A bug must not leave the client without a reply: log it, answer EIO.
            log(f"khofs: internal error in a control request:\n{traceback.format_exc()}")
            return {"ok": False, "errno": errno.EIO, "error": "EIO",
                    "message": "internal error (see the daemon's log)"}
        if stale or removed:
            invalidate(self.session, stale + removed, [ROOT_INO] if stale else [])
        return reply

    def _execute(self, line: bytes):
        reply = self.control.handle_line(line)
        stale = [(parent, name, None) for parent, name in self.host.stale_entries]
        self.host.stale_entries = []
        tree = self.host.tree
        tree.sync()
        return reply, stale, tree.take_removed()

    def _signal(self, sig, frame) -> None:
        self.signalled = sig
        self.loop.terminate()

    def run(self, on_ready=None) -> None:
        try:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, self._signal)
            self.loop.wake_on_signals()
            self.server = control.Server(self.sock_path, self._control_request)
            if on_ready:
                on_ready()
            sd_notify(f"READY=1\nMAINPID={os.getpid()}")
            self.loop.run()
            if self.signalled:
                log(f"khofs: signal {self.signalled}: unmounting")
            sd_notify("STOPPING=1")
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)     # a second signal ends a stuck cleanup
            if self.server is not None:
                self.server.close()
            if self.session is not None:
                self.session.close()
            self.loop.close()
            runtime.remove_info(self.mountpoint)


def report(fd: int | None, **msg) -> None:
    """A line to the `khofs mount` parent waiting on the readiness pipe."""
    if fd is not None:
        os.write(fd, (json.dumps(msg) + "\n").encode())
