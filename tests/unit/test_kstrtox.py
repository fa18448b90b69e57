"""lib/kstrtox.c and lib/cmdline.c parsing rules (KHO-SPEC §2, facts Q9)."""

import errno

import pytest
from hypothesis import given, strategies as st

from khofs.kernel.errors import KernelError
from khofs.kernel.kstrtox import kstrtobool, kstrtoull, kstrtouint, memparse, simple_strtoull

U64_MAX = (1 << 64) - 1
u64s = st.integers(min_value=0, max_value=U64_MAX)


def err_of(fn, *args):
    with pytest.raises(KernelError) as ei:
        fn(*args)
    return ei.value.errno


# -- kstrtoull base 0: the out/finalize write table of KHO-SPEC §2 -------------

@pytest.mark.parametrize("text", [b"1", b"1\n", b"1\0", b"0x1", b"+1", b"01", b"2"])
def test_kstrtoull_finalize_values_are_nonzero(text):
    assert kstrtoull(text, 0) != 0


@pytest.mark.parametrize("text", [b"0", b"00", b"0x0", b"+0"])
def test_kstrtoull_abort_values_are_zero(text):
    assert kstrtoull(text, 0) == 0


@pytest.mark.parametrize("text", [b" 1", b"1 ", b"1\r\n", b"1\n\n", b"-1", b"abc", b"y",
                                  b"0x", b"08", b"", b"+", b"++1", b"+-1", b"\n", b"1\n1",
                                  b"0xg", b"0b1", b"\x001"])
def test_kstrtoull_rejects_with_einval(text):
    assert err_of(kstrtoull, text, 0) == errno.EINVAL


@pytest.mark.parametrize("text", [b"18446744073709551616", b"18446744073709551616\n",
                                  b"0x10000000000000000", b"99999999999999999999x",
                                  b"02000000000000000000000"])
def test_kstrtoull_overflow_is_erange(text):
    # Overflow is checked before trailing characters in _kstrtoull.
    assert err_of(kstrtoull, text, 0) == errno.ERANGE


@pytest.mark.parametrize("text,value", [
    (b"18446744073709551615", U64_MAX),
    (b"0xffffffffffffffff", U64_MAX),
    (b"0XFFFFFFFFFFFFFFFF", U64_MAX),
    (b"01777777777777777777777", U64_MAX),
    (b"010", 8),
    (b"0x1f\n", 31),
    (b"+0x10", 16),
    (b"7\0garbage", 7),
    (b"12\n\0xyz", 12),
])
def test_kstrtoull_values(text, value):
    assert kstrtoull(text, 0) == value


def test_kstrtoull_explicit_bases():
    assert kstrtoull(b"010", 10) == 10
    assert err_of(kstrtoull, b"0x10", 10) == errno.EINVAL
    assert kstrtoull(b"0x10", 16) == 16
    assert kstrtoull(b"10", 16) == 16
    assert err_of(kstrtoull, b"0x", 16) == errno.EINVAL
    assert err_of(kstrtoull, b"8", 8) == errno.EINVAL


def test_kstrtouint_range():
    assert kstrtouint(b"4294967295", 10) == 0xFFFFFFFF
    assert err_of(kstrtouint, b"4294967296", 10) == errno.ERANGE
    assert err_of(kstrtouint, b"18446744073709551616", 10) == errno.ERANGE


@given(u64s)
def test_kstrtoull_decimal_roundtrip(n):
    assert kstrtoull(str(n).encode(), 0) == n
    assert kstrtoull(b"+" + str(n).encode() + b"\n", 0) == n


@given(u64s, st.sampled_from([b"0x", b"0X"]), st.booleans())
def test_kstrtoull_hex_roundtrip(n, prefix, upper):
    digits = f"{n:X}" if upper else f"{n:x}"
    assert kstrtoull(prefix + digits.encode(), 0) == n


@given(u64s)
def test_kstrtoull_octal_roundtrip(n):
    assert kstrtoull(b"0" + f"{n:o}".encode(), 0) == n


@given(st.integers(min_value=U64_MAX + 1, max_value=1 << 80))
def test_kstrtoull_too_big_is_erange(n):
    assert err_of(kstrtoull, str(n).encode(), 0) == errno.ERANGE
    assert err_of(kstrtoull, f"0x{n:x}".encode(), 0) == errno.ERANGE


# -- kstrtobool -------------------------------------------------------------------

@pytest.mark.parametrize("text", ["y", "Y", "1", "yes", "1abc", "on", "oN", "On", "ON", "onward",
                                  "t", "T", "true", "e", "E", "enable", "enabled"])
def test_kstrtobool_true(text):
    assert kstrtobool(text) is True
    assert kstrtobool(text.encode()) is True


@pytest.mark.parametrize("text", ["n", "N", "0", "no", "0x1", "off", "OFF", "oF", "Of",
                                  "f", "F", "false", "d", "D", "disable", "disabled"])
def test_kstrtobool_false(text):
    assert kstrtobool(text) is False


@pytest.mark.parametrize("text", ["", "o", "ox", "x", "2", " y", "\ny", "-1", "O", "\x1cy", "a", "s"])
def test_kstrtobool_garbage(text):
    assert err_of(kstrtobool, text) == errno.EINVAL


def test_kstrtobool_none():
    assert err_of(kstrtobool, None) == errno.EINVAL


# -- memparse / simple_strtoull ----------------------------------------------------

SUFFIXES = {"K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}


@pytest.mark.parametrize("suffix,shift", sorted(SUFFIXES.items()))
def test_memparse_suffixes_both_cases(suffix, shift):
    assert memparse("3" + suffix) == (3 << shift, 2)
    assert memparse("3" + suffix.lower()) == (3 << shift, 2)


@pytest.mark.parametrize("text,result", [
    ("0x10M", (16 << 20, 5)),
    ("0x1G", (1 << 30, 4)),
    ("0x1E", (30, 4)),           # 'E' is a hex digit here, not exa
    ("010M", (8 << 20, 4)),      # leading 0: octal
    ("08M", (0, 1)),             # octal stops at '8'
    ("0x", (0, 1)),              # no hex digit: octal "0", stops at 'x'
    ("0xK", (0, 1)),
    ("K", (0, 1)),               # a bare suffix: value 0 but one char consumed
    ("M,1G", (0, 1)),
    ("", (0, 0)),
    (",1G", (0, 0)),
    ("+1M", (0, 0)),             # simple_strtoull takes no sign
    ("-1M", (0, 0)),
    ("1KB", (1024, 2)),
    ("1KiB", (1024, 2)),
    ("12345", (12345, 5)),
    ("16E", (0, 3)),             # 16 << 60 wraps to 0
    ("17179869184G", (0, 12)),
])
def test_memparse_values(text, result):
    assert memparse(text) == result


def test_simple_strtoull_wraps():
    assert simple_strtoull(b"18446744073709551617", 0) == (1, 20)
    assert simple_strtoull(b"0x10000000000000001z", 0) == (1, 19)


@given(st.integers(min_value=0, max_value=(1 << 40)), st.sampled_from(sorted(SUFFIXES)),
       st.booleans())
def test_memparse_decimal_with_suffix(n, suffix, lower):
    s = suffix.lower() if lower else suffix
    text = f"{n}{s}"
    assert memparse(text) == ((n << SUFFIXES[suffix]) & U64_MAX, len(text))


@given(st.integers(min_value=1, max_value=U64_MAX))
def test_memparse_hex_and_octal(n):
    assert memparse(f"0x{n:x}") == (n, len(f"0x{n:x}"))
    assert memparse(f"0{n:o}") == (n, len(f"0{n:o}"))
