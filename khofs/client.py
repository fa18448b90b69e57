"""A small Python client for a mount's control socket."""

import base64
import errno
import json
import os
import socket

from . import runtime


class ControlError(OSError):
    """A request the daemon rejected; errno and strerror as the daemon gave them."""


class Client:
    """Talk to the khofs daemon of a mount point: `Client("/mnt/khofs").status()`."""

    def __init__(self, mountpoint: str, timeout: float = 60.0):
        self.mountpoint = os.path.realpath(mountpoint)
        self.path = runtime.paths(self.mountpoint)["sock"]
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except OSError as e:
            self.sock.close()
            raise ControlError(e.errno or errno.ECONNREFUSED,
                               f"no khofs daemon answers for {mountpoint} ({e.strerror})") from None
        self.rfile = self.sock.makefile("rb")

    def close(self):
        """Close the connection to the daemon."""
        self.rfile.close()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def call(self, cmd: str, **fields) -> dict:
        """Send one control request and return its reply; ControlError if it failed."""
        self.sock.sendall((json.dumps({"cmd": cmd, **fields}) + "\n").encode())
        line = self.rfile.readline()
        if not line:
            raise ControlError(errno.ECONNRESET, "the khofs daemon closed the connection")
        try:
            reply = json.loads(line)
            ok = reply.pop("ok")
        except (ValueError, AttributeError, KeyError, TypeError):
            raise ControlError(errno.EBADMSG,
                               f"the khofs daemon sent a malformed reply: {line[:80]!r}") from None
        if not ok:
            raise ControlError(reply.get("errno", errno.EIO), reply.get("message", "failed"))
        return reply

    # One method per request of docs/control-protocol.md (tests/unit/test_client.py checks).
    def status(self) -> dict:
        """Request status: the emulated kernel's status (as `khofs status --json`)."""
        return self.call("status")

    def memory_layout(self) -> dict:
        """Request memory_layout: RAM nodes, reserve_mem regions, root FDT pages and the
        incoming preserved runs (what `khofs map` reads beyond debugfs)."""
        return self.call("memory_layout")

    def root_fdt(self) -> bytes | None:
        """Request root_fdt: the whole root FDT when the kernel keeps it live past what
        out/fdt shows (6.19+), else None."""
        fdt = self.call("root_fdt")["fdt"]
        return None if fdt is None else base64.b64decode(fdt)

    def log(self) -> list[str]:
        """Request log: the kernel log lines of the current boot."""
        return self.call("log")["lines"]

    def mem_free(self, phys: int) -> None:
        """Request mem_free: give back an allocation mem_alloc made."""
        self.call("mem_free", phys=phys)

    def mem_alloc(self, size: int) -> int:
        """Allocate size bytes of simulated memory (whole pages); their address."""
        return self.call("mem_alloc", size=size)["phys"]

    def mem_write(self, phys: int, data: bytes) -> None:
        """Write data into simulated memory at phys."""
        self.call("mem_write", phys=phys, data=base64.b64encode(data).decode())

    def mem_read(self, phys: int, size: int) -> bytes:
        """size bytes of simulated memory at phys."""
        return base64.b64decode(self.call("mem_read", phys=phys, size=size)["data"])

    def preserve(self, phys: int, size: int) -> None:
        """kho_preserve_pages of [phys, phys + size)."""
        self.call("preserve", phys=phys, size=size)

    def unpreserve(self, phys: int, size: int) -> None:
        """kho_unpreserve_pages of [phys, phys + size)."""
        self.call("unpreserve", phys=phys, size=size)

    def preserve_folio(self, phys: int, order: int, count: int = 1) -> None:
        """kho_preserve_folio of count order-`order` folios from phys."""
        self.call("preserve_folio", phys=phys, order=order, count=count)

    def unpreserve_folio(self, phys: int, order: int) -> None:
        """kho_unpreserve_folio of the order-`order` folio at phys."""
        self.call("unpreserve_folio", phys=phys, order=order)

    def subtree_add(self, name: str, blob: bytes, preserve: bool = True) -> int:
        """Register a producer's sub-FDT (or, on 7.1, any blob) as name; its address."""
        return self.call("subtree_add", name=name, blob=base64.b64encode(blob).decode(),
                         preserve=preserve)["phys"]

    def subtree_add_dts(self, name: str, text, preserve: bool = True) -> int:
        """subtree_add of DTS text (str or bytes); khofs.devicetree.dts.DtsError names a bad line."""
        from .devicetree.dts import dts_to_dtb
        return self.subtree_add(name, dts_to_dtb(text), preserve)

    def subtree_remove(self, name: str) -> None:
        """Unregister the subtree name."""
        self.call("subtree_remove", name=name)

    def subtree_list(self) -> list[dict]:
        """The subtrees registered through the control socket: [{name, phys, size, preserve}]."""
        return self.call("subtree_list")["subtrees"]

    def test_kho(self, seed: int | None = None) -> None:
        """Load the KHO test module now (khofs.test_kho=1 does it at boot)."""
        self.call("test_kho", **({} if seed is None else {"seed": seed}))

    def kexec_load(self, cmdline: str | None = None, release: str | None = None,
                   abi: str | None = None) -> dict:
        """kexec -s -l of the next kernel: {cmdline, release, abi, handover}."""
        return self.call("kexec_load", **_given(cmdline=cmdline, release=release, abi=abi))

    def kexec_exec(self) -> dict:
        """kexec -e into the loaded kernel: {kexec_count, release, kho_in, notes, log}."""
        return self.call("kexec_exec")

    def kexec(self, cmdline: str | None = None, release: str | None = None,
              abi: str | None = None) -> dict:
        """Load and exec the next kernel; the new boot's log and notes."""
        return self.call("kexec", **_given(cmdline=cmdline, release=release, abi=abi))

    def reboot(self, defaults: bool = False, **args: str | int) -> dict:
        """Cold-boot the mount's machine in place: cmdline, abi, release, memory, nodes and
        boot_reserved as given (sizes as ints or as "1G"), the others the mount's, or with
        defaults=True khofs mount's defaults; the new boot's release, ABI, command line, log,
        warnings and what of the command line had no effect."""
        fields = {k: v for k, v in args.items() if v is not None}
        if defaults:
            fields["defaults"] = True
        return self.call("reboot", **fields)

    # The syscalls khofs run answers for a tool (docs/run.md); fields as the protocol names them.
    def sys_kexec_file_load(self, **fields: int | bool | str) -> dict:
        """Request sys_kexec_file_load: kexec_file_load(2) as the running kernel answers it."""
        return self.call("sys_kexec_file_load", **fields)

    def sys_kexec_load(self, **fields: int | bool | str | list) -> dict:
        """Request sys_kexec_load: kexec_load(2) of a user-space loader's segments."""
        return self.call("sys_kexec_load", **fields)

    def sys_reboot(self, **fields: int | bool | str) -> dict:
        """Request sys_reboot: reboot(2); a kexec reboot boots the loaded kernel at once."""
        return self.call("sys_reboot", **fields)

    def fail(self, op: str, err: str | int) -> None:
        """Make the next op (finalize or abort) fail with err (a name or number)."""
        self.call("fail", op=op, errno=err)


def _given(**fields) -> dict:
    return {k: v for k, v in fields.items() if v is not None}
