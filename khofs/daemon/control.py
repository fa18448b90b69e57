"""The control plane: JSON lines over a unix socket, one request one reply.

Every request is validated before it touches the kernel; a rejected request changes nothing.
Replies are {"ok": true, ...} or {"ok": false, "errno": N, "error": "ENAME", "message": ...}.
"""

import base64
import errno
import functools
import json
import os
import socket
import sys
import traceback

import trio

from .fields import (BadRequest, abi_field, bytes_field, errno_field, int_field, release_field,
                     size_field, str_field)
from .host import Host
from ..kernel.errors import KernelError
from ..kernel.physmem import PAGE_SHIFT, PAGE_SIZE
from ..kernel.producers.user import FailNext, UserSubtree, valid_node_name

MAX_LINE = 256 << 20


# What a reboot keeps: the mount's FUSE options and where its state lives (request field ->
# the `khofs mount` option).
REBOOT_FIXED = {"stat_size": "--stat-size", "cache": "--cache", "options": "-o",
                "state": "--state", "replay": "--replay"}


# command -> (handler, required fields, optional fields)
COMMANDS = {}


def command(name, required=(), optional=()):
    """Register the decorated method as control request name, with its fields."""
    def deco(fn):
        COMMANDS[name] = (fn, set(required), set(optional))
        return fn
    return deco


class Control:
    """The control requests of one mount, run against its current boot."""
    def __init__(self, host: Host):
        self.host = host
        self.user_allocs: dict[int, int] = {}        # phys -> pages, of the current boot
        self.subtrees: dict[str, UserSubtree] = {}
        host.on_boot.append(self._new_boot)

    def _new_boot(self, machine):
        self.user_allocs.clear()
        self.subtrees.clear()

    @property
    def m(self):
        """The machine of the current boot."""
        return self.host.machine

    def _kho(self):
        if self.m.kho_out is None:
            if self.m.profile is None:
                raise KernelError(errno.ENODEV, f"this kernel ({self.m.release}) has no KHO: "
                                  "it came in v6.16")
            raise KernelError(errno.ENODEV, "KHO is not enabled in this boot (kho=on)")
        return self.m.kho_out

    def handle_line(self, line: bytes) -> dict:
        """One JSON request line in, its reply out; never raises."""
        try:
            try:
                req = json.loads(line)
            except (ValueError, UnicodeDecodeError) as e:
                raise BadRequest(f"bad JSON: {e}") from None
            except RecursionError:
                raise BadRequest("bad JSON: nested too deeply") from None
            if not isinstance(req, dict):
                raise BadRequest("a request is a JSON object")
            cmd = req.get("cmd")
            if not isinstance(cmd, str):
                raise BadRequest("'cmd' must be a string")
            if cmd not in COMMANDS and cmd.startswith("sys_"):
                from . import syscalls  # noqa: F401  (registers the requests of khofs run)
            if cmd not in COMMANDS:
                raise BadRequest(f"unknown command {cmd!r} (known: {', '.join(sorted(COMMANDS))})",
                                 errno.EOPNOTSUPP)
            fn, required, optional = COMMANDS[cmd]
            fields = set(req) - {"cmd"}
            missing = required - fields
            if missing:
                raise BadRequest(f"{cmd}: missing {', '.join(sorted(missing))}")
            unknown = fields - required - optional
            if unknown:
                raise BadRequest(f"{cmd}: unknown field(s) {', '.join(sorted(unknown))}")
            result = fn(self, req)
            return {"ok": True, **(result or {})}
        except KernelError as e:
            return {"ok": False, "errno": e.errno, "error": errno.errorcode.get(e.errno, str(e.errno)),
                    "message": e.message}
        except Exception as e:
            print(f"khofs: internal error handling {line[:200]!r}:\n{traceback.format_exc()}",
                  file=sys.stderr, flush=True)
            return {"ok": False, "errno": errno.EIO, "error": "EIO",
                    "message": f"internal error ({type(e).__name__}); see the daemon log"}

    # -- commands --------------------------------------------------------------
    @command("status")
    def status(self, req):
        """Request status: the kernel's status."""
        return self.m.status()

    @command("root_fdt")
    def root_fdt(self, req):
        """Request root_fdt: the whole root FDT, base64, when the kernel keeps one beyond
        what out/fdt shows (6.19+); null otherwise."""
        fdt = self.m.root_fdt()
        return {"fdt": None if fdt is None else base64.b64encode(fdt).decode()}

    @command("memory_layout")
    def memory_layout(self, req):
        """Request memory_layout: what `khofs map` needs beyond debugfs."""
        return self.m.memory_layout()

    @command("log")
    def log(self, req):
        """Request log: this boot's kernel log lines."""
        return {"lines": [line.text for line in self.m.dmesg]}

    @command("mem_alloc", ["size"])
    def mem_alloc(self, req):
        """Request mem_alloc: whole pages of simulated memory for the caller."""
        size = int_field(req, "size", 1, self.m.mem.size)
        pages = (size + PAGE_SIZE - 1) >> PAGE_SHIFT
        phys = self.m.pages.alloc_range(pages)
        self.user_allocs[phys] = pages
        return {"phys": phys, "size": pages * PAGE_SIZE}

    @command("mem_free", ["phys"])
    def mem_free(self, req):
        """Request mem_free: give back an allocation made with mem_alloc."""
        phys = int_field(req, "phys")
        if phys not in self.user_allocs:
            raise BadRequest(f"0x{phys:x} is not an allocation made with mem_alloc", errno.ENOENT)
        self.m.pages.free_range(phys, self.user_allocs.pop(phys))

    @command("mem_write", ["phys", "data"])
    def mem_write(self, req):
        """Request mem_write: bytes written into simulated memory."""
        phys, data = int_field(req, "phys"), bytes_field(req, "data")
        self.m.mem.write(phys, data)
        return {"written": len(data)}

    @command("mem_read", ["phys", "size"])
    def mem_read(self, req):
        """Request mem_read: bytes of simulated memory, base64."""
        phys, size = int_field(req, "phys"), int_field(req, "size", 0, 1 << 30)
        return {"data": base64.b64encode(self.m.mem.read(phys, size)).decode()}

    @command("preserve", ["phys", "size"])
    def preserve(self, req):
        """Request preserve: kho_preserve_pages of a page range."""
        self._kho().preserve_pages(int_field(req, "phys"), int_field(req, "size", 0))

    @command("preserve_folio", ["phys", "order"], ["count"])
    def preserve_folio(self, req):
        """Request preserve_folio: kho_preserve_folio of one or more folios."""
        phys, order = int_field(req, "phys"), int_field(req, "order", 0, 51)
        count = int_field(req, "count", 1) if "count" in req else 1
        self._kho().preserve_folios(phys, count, order)

    @command("unpreserve", ["phys", "size"])
    def unpreserve(self, req):
        """Request unpreserve: kho_unpreserve_pages of a page range."""
        self._kho().unpreserve_pages(int_field(req, "phys"), int_field(req, "size", 0))

    @command("unpreserve_folio", ["phys", "order"])
    def unpreserve_folio(self, req):
        """Request unpreserve_folio: kho_unpreserve_folio."""
        self._kho().unpreserve_folio(int_field(req, "phys"), int_field(req, "order", 0, 51))

    @command("subtree_add", ["name", "blob"], ["preserve"])
    def subtree_add(self, req):
        """Request subtree_add: a producer registers its blob under a name."""
        kho = self._kho()
        name, blob = str_field(req, "name"), bytes_field(req, "blob")
        preserve = req.get("preserve", True)
        if not isinstance(preserve, bool):
            raise BadRequest("'preserve' must be true or false")
        if not valid_node_name(name):
            raise BadRequest(f"{name!r} is not a valid node name (1-31 of [A-Za-z0-9,._+@-])")
        taken = {p.name for p in kho.producers} | set(self.subtrees)
        if not kho.profile.fdt_at_boot:
            taken.add("fdt")
        if name in taken:
            raise BadRequest(f"a subtree named {name!r} is already registered", errno.EEXIST)
        producer = UserSubtree(kho, name, blob, preserve)
        try:
            kho.add_producer(producer)     # the kernel answers a taken name with EEXIST
        except KernelError:
            producer.release(kho)
            raise
        self.subtrees[name] = producer
        return {"phys": producer.phys}

    @command("subtree_remove", ["name"])
    def subtree_remove(self, req):
        """Request subtree_remove: the producer unregisters."""
        name = str_field(req, "name")
        producer = self.subtrees.get(name)
        if producer is None:
            raise BadRequest(f"no subtree named {name!r} was added", errno.ENOENT)
        if self._kho().remove_producer(producer):
            producer.release(self._kho())
        del self.subtrees[name]

    @command("subtree_list")
    def subtree_list(self, req):
        """Request subtree_list: the producers registered through this socket."""
        return {"subtrees": [{"name": p.name, "phys": p.phys, "size": len(p.blob),
                              "preserve": p.preserve} for p in self.subtrees.values()]}

    @command("fail", ["op", "errno"])
    def fail(self, req):
        """Request fail: the next finalize or abort fails with an errno."""
        op = str_field(req, "op")
        if op not in ("finalize", "abort"):
            raise BadRequest(f"can inject failures into finalize or abort, not {op!r}")
        prof = self._kho().profile
        if not (prof.can_abort if op == "abort" else prof.has_finalize):
            raise BadRequest(f"ABI {prof.name} has no {op}", errno.EOPNOTSUPP)
        self._kho().register_notifier(FailNext(op, errno_field(req["errno"])), first=True)

    @command("test_kho", [], ["seed"])
    def test_kho(self, req):
        """Request test_kho: load the KHO test module now."""
        seed = int_field(req, "seed") if "seed" in req else None
        self.m.start_test_kho(seed)

    @command("kexec_load", [], ["cmdline", "release", "abi"])
    def kexec_load(self, req):
        """Request kexec_load: kexec -s -l of the next kernel."""
        return self.host.kexec_load(str_field(req, "cmdline", True), release_field(req), abi_field(req))

    @command("kexec_exec")
    def kexec_exec(self, req):
        """Request kexec_exec: kexec -e into the loaded kernel."""
        return self.host.kexec_exec()

    @command("kexec", [], ["cmdline", "release", "abi"])
    def kexec(self, req):
        """Request kexec: load and exec in one step."""
        self.host.kexec_load(str_field(req, "cmdline", True), release_field(req), abi_field(req))
        return self.host.kexec_exec()

    @command("reboot", [], ["cmdline", "abi", "release", "memory", "nodes", "boot_reserved",
                            "defaults", *REBOOT_FIXED])
    def reboot(self, req):
        """Request reboot: a cold boot in place, with the mount's arguments (or with
        `defaults`, khofs mount's) but those given."""
        fixed = [REBOOT_FIXED[k] for k in REBOOT_FIXED if k in req]
        if fixed:
            raise BadRequest(f"{', '.join(fixed)} cannot change in a reboot "
                             "(mount anew for that)")
        defaults = req.get("defaults", False)
        if not isinstance(defaults, bool):
            raise BadRequest("'defaults' must be true or false")
        changes = {}
        if "cmdline" in req:
            changes["cmdline"] = str_field(req, "cmdline")
        if "abi" in req:
            changes["abi"] = abi_field(req)
        if "release" in req:
            changes["release"] = release_field(req)
        if "memory" in req:
            changes["memory"] = size_field(req, "memory", PAGE_SIZE)
        if "nodes" in req:
            changes["nodes"] = int_field(req, "nodes", 1)
        if "boot_reserved" in req:
            changes["boot_reserved"] = size_field(req, "boot_reserved", 1)
        return self.host.reboot(defaults, **changes)


async def serve(path: str, execute, task_status=trio.TASK_STATUS_IGNORED):
    """The control socket: each connection's request lines answered in order with
    `await execute(line)` -> reply dict. Runs until cancelled; the socket file goes with it."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(16)
    try:
        task_status.started()
        await trio.serve_listeners(functools.partial(_serve_connection, execute),
                                   [trio.SocketListener(sock)])
    finally:
        sock.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


async def _send(stream, reply) -> bool:
    try:
        await stream.send_all((json.dumps(reply) + "\n").encode())
        return True
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False


async def _serve_connection(execute, stream) -> None:
    buf = bytearray()
    async with stream:
        while True:
            try:
                data = await stream.receive_some(1 << 20)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            buf += data
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    break
                line, buf = bytes(buf[:nl]), buf[nl + 1:]
                # A request that started runs to its reply, even while the daemon stops.
                with trio.CancelScope(shield=True):
                    if not await _send(stream, await execute(line)):
                        return
            if len(buf) > MAX_LINE:
                await _send(stream, {"ok": False, "errno": errno.E2BIG, "error": "E2BIG",
                                     "message": f"request line longer than {MAX_LINE} bytes"})
                return
