"""The run's connection to the mount's daemon: the control protocol over trio."""

import errno
import json
import socket

import trio


class LinkError(Exception):
    """The daemon refused a request (errno, message) or went away."""
    def __init__(self, err: int, message: str):
        super().__init__(message)
        self.errno = err
        self.message = message


class Link:
    """One control connection; requests one at a time."""
    def __init__(self, path: str):
        self.path = path
        self.sock = None
        self.buf = bytearray()
        self.lock = trio.Lock()

    async def connect(self) -> "Link":
        """Connect to the control socket."""
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await self.sock.connect(self.path)
        return self

    async def call(self, request: str, **fields) -> dict:
        """One request; its reply, or LinkError."""
        async with self.lock:
            try:
                await self.sock.send((json.dumps({"cmd": request, **fields}) + "\n").encode())
                while b"\n" not in self.buf:
                    data = await self.sock.recv(1 << 20)
                    if not data:
                        raise LinkError(errno.ECONNRESET, "the khofs daemon went away")
                    self.buf += data
            except OSError as e:
                raise LinkError(e.errno or errno.EIO, "the khofs daemon went away") from None
            nl = self.buf.index(b"\n")
            line, self.buf = bytes(self.buf[:nl]), self.buf[nl + 1:]
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise LinkError(reply["errno"], reply["message"])
        return reply

    async def wait_closed(self) -> None:
        """Return when the daemon closes this (otherwise idle) connection."""
        while True:
            try:
                if not await self.sock.recv(4096):
                    return
            except OSError:
                return
