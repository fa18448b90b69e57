"""The khofs daemon: the emulated kernel behind a FUSE mount, until unmounted or signalled."""

import json
import os
import signal
import socket
import sys

import pyfuse3
import trio

from . import control, fuseloop, runtime
from .fuse import KhoFuse, forget_removed, invalidate
from .host import Host


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


class _InitOnly(pyfuse3.Operations):
    """What pyfuse3 reads at INIT (the capabilities libfuse asks for); khofs.fuse answers
    every request after it."""
    supports_dot_lookup = True
    enable_writeback_cache = False


class Daemon:
    def __init__(self, mountpoint: str, host: Host, stat_size: str = "content",
                 fuse_options=(), debug_fuse: bool = False):
        self.mountpoint = mountpoint          # absolute and resolved by the caller
        self.host = host
        self.fuse = KhoFuse(host.tree, stat_size, deny_others="allow_root" in fuse_options,
                            owner=os.getuid())
        host.on_new_tree.append(self.fuse.set_tree)
        self.control = control.Control(host)
        self.control.settle = self._drop_stale_entries
        self.sock_path = runtime.paths(mountpoint)["sock"]
        self.options = set(pyfuse3.default_options)     # default_permissions: the kernel checks modes
        self.options |= {"fsname=khofs", "subtype=khofs"}
        self.options |= set(fuse_options)
        self.debug_fuse = debug_fuse
        if debug_fuse:
            self.options.add("debug")     # libfuse logs INIT; khofs.fuseloop the rest
        self._mounted = False

    async def _drop_stale_entries(self) -> None:
        """After a control request, make the kernel forget entries it removed (an old boot's
        after a kexec) before the request is answered."""
        stale, self.host.stale_entries = self.host.stale_entries, []
        if stale:
            def work():
                invalidate([(parent, name, None) for parent, name in stale])
                try:
                    pyfuse3.invalidate_inode(pyfuse3.ROOT_INODE, attr_only=True)
                except OSError:
                    pass
            await trio.to_thread.run_sync(work)
        await forget_removed(self.host.tree)

    def mount(self) -> None:
        pyfuse3.init(_InitOnly(), self.mountpoint, sorted(self.options))
        self._mounted = True
        fd = _dev_fuse_fd()
        if fd is None:
            raise RuntimeError("pyfuse3 mounted, but no /dev/fuse fd is open")
        self.loop = fuseloop.take_over(self.fuse, fd, self.debug_fuse)

    async def _signals(self):
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for sig in sigs:
                log(f"khofs: signal {sig}: unmounting")
                self.loop.terminate()
                return

    async def _main(self, on_ready):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._signals)
            await nursery.start(control.serve, self.control, self.sock_path)
            if on_ready:
                on_ready()
            sd_notify(f"READY=1\nMAINPID={os.getpid()}")
            await pyfuse3.main(min_tasks=1, max_tasks=1)
            sd_notify("STOPPING=1")
            nursery.cancel_scope.cancel()

    def run(self, on_ready=None) -> None:
        try:
            trio.run(self._main, on_ready)
        finally:
            fuseloop.uninstall()
            if self._mounted:
                pyfuse3.close(unmount=True)
                self._mounted = False
            for p in (self.sock_path,):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
            runtime.remove_info(self.mountpoint)


def _dev_fuse_fd():
    """The fd pyfuse3.init opened on /dev/fuse (pyfuse3 does not expose it)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                return int(name)
        except OSError:
            continue
    return None


def report(fd: int | None, **msg) -> None:
    """A line to the `khofs mount` parent waiting on the readiness pipe."""
    if fd is not None:
        os.write(fd, (json.dumps(msg) + "\n").encode())
