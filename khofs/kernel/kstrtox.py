"""Number and boolean parsing with the kernel's rules (lib/kstrtox.c, lib/cmdline.c)."""

from .cmdline import cmdline_bytes
from .errors import KernelError
import errno

U64_MASK = (1 << 64) - 1


def _show(b: bytes) -> str:
    """Bytes for an error message: text where printable, escapes otherwise."""
    return '"' + b.decode("ascii", "backslashreplace").encode("unicode_escape").decode() + '"'


def _fixup_radix(s: bytes, base: int) -> tuple[int, int]:
    """_parse_integer_fixup_radix: returns (base, index after any 0x prefix)."""
    i = 0
    if base == 0:
        if s[:1] == b"0":
            if s[1:2].lower() == b"x" and _digit(s[2:3], 16) is not None:
                base = 16
            else:
                base = 8
        else:
            base = 10
    if base == 16 and s[:1] == b"0" and s[1:2].lower() == b"x":
        i = 2
    return base, i


def _digit(c: bytes, base: int):
    if not c:
        return None
    ch = chr(c[0]).lower()
    if "0" <= ch <= "9":
        v = ord(ch) - 48
    elif "a" <= ch <= "f":
        v = ord(ch) - 87
    else:
        return None
    return v if v < base else None


def _parse_integer(s: bytes, base: int) -> tuple[int, int, bool]:
    """_parse_integer: (value mod 2**64, digits consumed, overflowed)."""
    res = 0
    n = 0
    overflow = False
    while n < len(s):
        v = _digit(s[n:n + 1], base)
        if v is None:
            break
        res = res * base + v
        if res > U64_MASK:
            overflow = True
            res &= U64_MASK
        n += 1
    return res, n, overflow


def kstrtoull(s: bytes, base: int = 0) -> int:
    """kstrtoull: the whole string must be the number, one trailing newline allowed.

    The string ends at the first NUL byte, as a C string would.
    """
    s = bytes(s).split(b"\0", 1)[0]
    if s[:1] == b"+":
        s = s[1:]
    base, i = _fixup_radix(s, base)
    val, n, overflow = _parse_integer(s[i:], base)
    if n == 0:
        raise KernelError(errno.EINVAL, "no digits")
    if overflow:
        raise KernelError(errno.ERANGE, "value does not fit in 64 bits")
    rest = s[i + n:]
    if rest[:1] == b"\n":
        rest = rest[1:]
    if rest:
        raise KernelError(errno.EINVAL, f"unexpected {_show(rest[:8])} after the number")
    return val


def kstrtouint(s: bytes, base: int = 0) -> int:
    """kstrtouint: kstrtoull that must fit in 32 bits (ERANGE otherwise)."""
    val = kstrtoull(s, base)
    if val > 0xFFFFFFFF:
        raise KernelError(errno.ERANGE, "value does not fit in 32 bits")
    return val


def kstrtobool(s) -> bool:
    """kstrtobool (6.2+): e/E/y/Y/t/T/1 true, d/D/n/N/f/F/0 false, on/off by the second character."""
    if s is None:
        raise KernelError(errno.EINVAL, "no value")
    if isinstance(s, str):
        s = cmdline_bytes(s)
    c0 = s[:1]
    if c0 and c0 in b"eEyYtT1":
        return True
    if c0 and c0 in b"dDnNfF0":
        return False
    if c0 in (b"o", b"O"):
        c1 = s[1:2]
        if c1 in (b"n", b"N"):
            return True
        if c1 in (b"f", b"F"):
            return False
    raise KernelError(errno.EINVAL, f"{_show(s)} is not a boolean (y/n/1/0/on/off/true/false/enable/disable)")


def simple_strtoull(s: bytes, base: int = 0) -> tuple[int, int]:
    """simple_strtoull: (value, characters consumed). No error checking, wraps on overflow."""
    b, i = _fixup_radix(s, base)
    val, n, _ = _parse_integer(s[i:], b)
    if n == 0:
        # The kernel still consumed a "0x" prefix only when a hex digit followed; for
        # a bare "0" the digit itself is consumed as octal zero.
        return 0, 0
    return val, i + n


_SUFFIX_SHIFT = {b"k": 10, b"m": 20, b"g": 30, b"t": 40, b"p": 50, b"e": 60}


def memparse(s) -> tuple[int, int]:
    """memparse: a number with an optional K/M/G/T/P/E suffix. Returns (value, consumed)."""
    if isinstance(s, str):
        s = cmdline_bytes(s)
    val, n = simple_strtoull(s, 0)
    # The suffix is looked at even when no digit was read, as the kernel does.
    shift = _SUFFIX_SHIFT.get(s[n:n + 1].lower())
    if shift is not None:
        val = (val << shift) & U64_MASK
        n += 1
    return val, n
