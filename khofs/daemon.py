"""The khofs daemon: the emulated kernel behind a FUSE mount, until unmounted or signalled."""

import json
import logging
import os
import signal

import pyfuse3
import trio

from . import runtime
from .debugfs import Tree
from .fuse import KhoOperations
from .kernel.machine import Machine

log = logging.getLogger("khofs")


class Daemon:
    def __init__(self, mountpoint: str, machine: Machine, stat_size: str = "content",
                 fuse_options=(), debug_fuse: bool = False):
        self.mountpoint = mountpoint
        self.machine = machine
        self.tree = Tree(machine)
        self.ops = KhoOperations(self.tree, stat_size)
        self.options = set(pyfuse3.default_options)     # default_permissions: the kernel checks modes
        self.options |= {"fsname=khofs", "subtype=khofs"}
        self.options |= set(fuse_options)
        if debug_fuse:
            self.options.add("debug")
        self._mounted = False

    def mount(self) -> None:
        pyfuse3.init(self.ops, self.mountpoint, list(self.options))
        self._mounted = True

    async def _signals(self, cancel_scope):
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for sig in sigs:
                log.info("signal %d: unmounting", sig)
                pyfuse3.terminate()
                return

    async def _main(self, on_ready):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._signals, nursery.cancel_scope)
            if on_ready:
                on_ready()
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    def run(self, on_ready=None) -> None:
        try:
            trio.run(self._main, on_ready)
        finally:
            if self._mounted:
                pyfuse3.close(unmount=True)
                self._mounted = False
            runtime.remove_info(self.mountpoint)


def report(fd: int | None, **msg) -> None:
    """A line to the `khofs mount` parent waiting on the readiness pipe."""
    if fd is not None:
        os.write(fd, (json.dumps(msg) + "\n").encode())
