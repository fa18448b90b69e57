"""The control requests `khofs run` sends for a tool's kexec syscalls.

Loaded on the first such request, so a plain mount never imports them. The arguments arrive
as the supervisor read them from the tool: bytes in base64, or the errno a read gave.
"""

import base64
from dataclasses import asdict

from .control import Control, command
from .fields import BadRequest, int_field as _int
from ..kernel import syscalls as sc


def _read(req, key, optional=True):
    """A read argument: bytes, an errno (int), or None."""
    v = req.get(key)
    if v is None and optional:
        return None
    if isinstance(v, int) and not isinstance(v, bool):
        if not 0 < v < 4096:
            raise BadRequest(f"'{key}' as an errno must be 1..4095")
        return v
    if isinstance(v, str):
        try:
            return base64.b64decode(v, validate=True)
        except ValueError:
            pass
    raise BadRequest(f"'{key}' must be base64 bytes or an errno number")


def _cap(req):
    v = req.get("cap_sys_boot")
    if not isinstance(v, bool):
        raise BadRequest("'cap_sys_boot' must be true or false")
    return v


def _loaded(m):
    return {"kexec_loaded": m.image is not None, "kexec_crash_loaded": m.crash_image is not None}


@command("sys_kexec_file_load", ["cap_sys_boot", "flags", "kernel", "cmdline_len"],
         ["initrd", "cmdline"])
def sys_kexec_file_load(self: Control, req):
    """Request sys_kexec_file_load: kexec_file_load(2) as the running kernel answers it."""
    r = sc.sys_kexec_file_load(self.m, cap_sys_boot=_cap(req), flags=_int(req, "flags"),
                               kernel=_read(req, "kernel", False), initrd=_read(req, "initrd"),
                               cmdline=_read(req, "cmdline"),
                               cmdline_len=_int(req, "cmdline_len"))
    return {**asdict(r), **_loaded(self.m)}


@command("sys_kexec_load", ["cap_sys_boot", "entry", "nr_segments", "flags"],
         ["segments", "bufs"])
def sys_kexec_load(self: Control, req):
    """Request sys_kexec_load: kexec_load(2) of the user-space loader's segments."""
    segs = _read(req, "segments")
    bufs = req.get("bufs")
    if isinstance(bufs, list):
        bufs = [_read({"b": b}, "b", False) for b in bufs]
        if any(isinstance(b, int) for b in bufs):
            bufs = next(b for b in bufs if isinstance(b, int))
    elif bufs is not None and not isinstance(bufs, int):
        raise BadRequest("'bufs' must be a list of base64 buffers or an errno")
    nr = _int(req, "nr_segments")
    if nr and nr <= sc.KEXEC_SEGMENT_MAX and segs is None:
        raise BadRequest("sys_kexec_load: missing segments")
    r = sc.sys_kexec_load(self.m, cap_sys_boot=_cap(req), entry=_int(req, "entry"),
                          nr_segments=nr, flags=_int(req, "flags"),
                          segments=segs if isinstance(segs, int) else (segs, bufs))
    return {**asdict(r), **_loaded(self.m)}


@command("sys_reboot", ["cap_sys_boot", "magic1", "magic2", "reboot_cmd"], ["arg"])
def sys_reboot(self: Control, req):
    """Request sys_reboot: reboot(2). A kexec reboot boots the loaded kernel at once; a
    restart is left to the caller (the `reboot` request), the rest change nothing here."""
    action = sc.sys_reboot(self.m, cap_sys_boot=_cap(req), magic1=_int(req, "magic1"),
                           magic2=_int(req, "magic2"), cmd=_int(req, "reboot_cmd"),
                           arg=_read(req, "arg"))
    out = {"action": action}
    if action == "kexec":
        out["kexec"] = self.host.kexec_exec()
    return out

