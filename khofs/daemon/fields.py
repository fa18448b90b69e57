"""The fields of control requests, checked before a request touches the kernel."""

import base64
import errno

from ..kernel.errors import KernelError
from ..kernel.kstrtox import memparse
from ..kernel.profile import PROFILES


class BadRequest(KernelError):
    """A request refused before it touches the kernel (EINVAL unless told)."""
    def __init__(self, message, err=errno.EINVAL):
        super().__init__(err, message)


def int_field(req, key, lo=0, hi=(1 << 64) - 1):
    """req[key], an integer in [lo, hi]."""
    v = req.get(key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"'{key}' must be an integer")
    if not lo <= v <= hi:
        raise BadRequest(f"'{key}' = {v} is out of range [{lo}, {hi}]", errno.ERANGE)
    return v


def str_field(req, key, optional=False):
    """req[key], a string (or None if optional and absent)."""
    v = req.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise BadRequest(f"'{key}' must be a string")
    return v


def bytes_field(req, key):
    """req[key], base64 bytes, decoded."""
    try:
        return base64.b64decode(str_field(req, key), validate=True)
    except ValueError:          # binascii.Error, or characters outside ASCII
        raise BadRequest(f"'{key}' must be base64") from None


def errno_field(v):
    """An errno given by name (ENOMEM) or number."""
    if isinstance(v, int) and not isinstance(v, bool) and 0 < v < 4096:
        return v
    if isinstance(v, str) and isinstance(getattr(errno, v.upper(), None), int):
        return getattr(errno, v.upper())
    raise BadRequest(f"'errno' must be an errno name or number, not {v!r}")


def size_field(req, key, lo):
    """req[key], an integer of at least lo, or a size as `khofs mount` takes it ("1G")."""
    v = req.get(key)
    if isinstance(v, str):
        val, n = memparse(v)
        if not v or n != len(v.encode()):
            raise BadRequest(f"'{key}' = {v!r} is not a size (use e.g. 4G, 512M, 0x100000)")
        req = {key: val}
    return int_field(req, key, lo)


def abi_field(req):
    """req["abi"], a known ABI profile, or None."""
    a = str_field(req, "abi", True)
    if a is not None and a not in PROFILES:
        raise BadRequest(f"unknown ABI profile {a!r} (known: {', '.join(PROFILES)})")
    return a


def release_field(req):
    """req["release"], a uname -r string, or None."""
    r = str_field(req, "release", True)
    if r is not None and not (0 < len(r) <= 64 and r.isprintable()):
        raise BadRequest("'release' must be 1 to 64 printable characters (uname -r)")
    return r
