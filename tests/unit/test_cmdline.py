"""Command-line splitting (next_arg/parse_args) and the early/__setup parameters of a boot."""

import pytest

from khofs.kernel.cmdline import parameq, split_cmdline
from khofs.kernel.machine import Machine, MachineConfig

GIB = 1 << 30
MIB = 1 << 20


def boot(cmdline, **cfg):
    cfg.setdefault("memory", GIB)
    return Machine(cmdline, MachineConfig(**cfg))


def texts(m):
    return [line.text for line in m.dmesg]


# -- split_cmdline ------------------------------------------------------------------

def test_split_plain_params_and_values():
    assert split_cmdline("kho=on  quiet\tkho_scratch=16M,64M,16M") == [
        ("kho", "on"), ("quiet", None), ("kho_scratch", "16M,64M,16M")]


def test_split_value_keeps_later_equals():
    assert split_cmdline("a=b=c") == [("a", "b=c")]


def test_split_equals_at_first_char_does_not_split():
    # next_arg uses equals == 0 for "no '=' seen", so an '=' at index 0 is skipped.
    assert split_cmdline("=foo") == [("=foo", None)]
    assert split_cmdline("=a=b") == [("=a", "b")]


def test_split_quoted_double_dash_ends_kernel_params():
    assert split_cmdline('kho=on "--" kho=off') == [("kho", "on")]


def test_split_empty_value_is_not_none():
    assert split_cmdline("kho=") == [("kho", "")]


def test_split_quoted_value_groups_spaces():
    assert split_cmdline('foo="bar baz" x') == [("foo", "bar baz"), ("x", None)]


def test_split_quoted_whole_param():
    assert split_cmdline('"foo=bar baz" x') == [("foo", "bar baz"), ("x", None)]
    assert split_cmdline('"quiet" x') == [("quiet", None), ("x", None)]


# next_arg: a value starting with '"' loses that quote; its last char is
# dropped only if it is a quote.
def test_split_value_opening_quote_stripped_when_value_ends_otherwise():
    assert split_cmdline('foo="bar"baz') == [("foo", 'bar"baz')]


def test_split_value_unterminated_quote():
    assert split_cmdline('foo="bar') == [("foo", "bar")]
    assert split_cmdline('foo="bar baz') == [("foo", "bar baz")]


def test_split_double_dash_ends_kernel_params():
    assert split_cmdline("kho=on -- kho=off init_arg") == [("kho", "on")]
    assert split_cmdline("--") == []


def test_split_whitespace_only():
    assert split_cmdline("   \t ") == []


def test_split_on_kernel_isspace_only():
    # \x1c-\x1f are Python whitespace but control characters to the kernel's ctype.
    assert split_cmdline("a\x1cb\vc\x1fd\re") == [("a\x1cb", None), ("c\x1fd", None), ("e", None)]
    # The byte 0xa0 is space in the kernel's Latin-1 table (Python shows a byte from argv
    # that is not UTF-8 as a surrogate).
    assert split_cmdline("kho=on\udca0quiet") == [("kho", "on"), ("quiet", None)]


def test_split_works_on_the_utf8_bytes():
    # U+00A0 reaches the kernel as c2 a0: the word ends after c2. U+00E0 is c3 a0.
    assert split_cmdline("kho=on\u00a0quiet") == [("kho", "on\udcc2"), ("quiet", None)]
    assert split_cmdline("a\u00e0b") == [("a\udcc3", None), ("b", None)]


def test_bytes_that_are_not_utf8_are_parameters_like_any_other():
    m = boot("kho=on\udcff kho=on reserve_mem=1M:64:\u00a0")
    assert m.kho_out is not None
    assert len(m.reserve_mem) == 1          # the name is the byte c2: not blank
    assert boot("kho=on reserve_mem=1M:64:\udca0").reserve_mem == []      # a0 alone is


def test_reserve_mem_name_of_control_characters_is_text():
    m = boot("kho=on reserve_mem=1M:64:\x1f reserve_mem=1M:64:oo\x1cps")
    assert [r.name for r in m.reserve_mem] == ["\x1f", "oo\x1cps"]


@pytest.mark.parametrize("a,b,eq", [
    ("kho_scratch", "kho-scratch", True),
    ("kho-scratch", "kho_scratch", True),
    ("reserve-mem", "reserve_mem", True),
    ("kho", "kho_", False),
    ("kho", "KHO", False),
])
def test_parameq_dash_underscore(a, b, eq):
    assert parameq(a, b) is eq


# -- early params: kho= ----------------------------------------------------------------

@pytest.mark.parametrize("val", ["on", "y", "Y", "1", "yes", "ON", "oN", "true", "enable"])
def test_kho_enabled_values(val):
    m = boot(f"kho={val}")
    assert m.kho_enable is True
    assert m.kho_out is not None
    assert m.warnings() == []


@pytest.mark.parametrize("val", ["off", "n", "N", "0", "OFF", "false", "disable"])
def test_kho_disabled_values(val):
    m = boot(f"kho={val}")
    assert m.kho_enable is False
    assert m.kho_out is None
    assert m.warnings() == []


def test_no_kho_param_means_off():
    m = boot("quiet")
    assert m.kho_enable is False
    assert m.kho_out is None


def test_kho_without_value_is_malformed():
    m = boot("kho")
    assert "Malformed early option 'kho'" in texts(m)
    assert m.kho_out is None
    assert any(s.startswith("kho") for s in m.ignored)


@pytest.mark.parametrize("cmdline", ["kho=", "kho=x", "kho=awake"])
def test_kho_bad_value_is_malformed(cmdline):
    m = boot(cmdline)
    assert "Malformed early option 'kho'" in texts(m)
    assert m.kho_out is None


def test_last_kho_wins():
    assert boot("kho=on kho=off").kho_out is None
    assert boot("kho=off kho=on").kho_out is not None


def test_kho_after_double_dash_is_not_a_kernel_param():
    assert boot("-- kho=on").kho_out is None


def test_dash_spelling_of_early_param():
    m = boot("kho=on kho-scratch=16M,64M,16M")
    assert m.scratch_len_text() == b"0x1000000\n0x4000000\n0x1000000\n"


# -- early params: kho_scratch= -------------------------------------------------------------

def test_bad_kho_scratch_is_malformed_and_default_applies():
    good = boot("kho=on", boot_reserved=38 * MIB)
    bad = boot("kho=on kho_scratch=abc", boot_reserved=38 * MIB)
    assert "Malformed early option 'kho_scratch'" in texts(bad)
    assert bad.kho_out is not None
    assert bad.scratch == good.scratch
    assert bad.scratch[0][1] == 76 * MIB


def test_malformed_message_uses_the_given_spelling():
    m = boot("kho=on kho-scratch=abc")
    assert "Malformed early option 'kho-scratch'" in texts(m)


def test_failed_kho_scratch_keeps_earlier_value():
    m = boot("kho=on kho_scratch=16M,64M,16M kho_scratch=0,0,0")
    assert "Malformed early option 'kho_scratch'" in texts(m)
    assert m.scratch_len_text() == b"0x1000000\n0x4000000\n0x1000000\n"


# -- __setup params: reserve_mem= -----------------------------------------------------------

@pytest.mark.parametrize("val", [
    "0:4K:name",          # size 0
    "1M",                 # no ':'
    "1M:4K",              # no second ':'
    "1M:4K:",             # empty name
    "1M:4K:0123456789abcdef",   # 16 chars: too long
    '"1M:4K:   "',        # blank name
    ":4K:name",           # no size
])
def test_reserve_mem_errors_are_silent_but_recorded(val):
    m = boot(f"kho=on reserve_mem={val}")
    assert m.reserve_mem == []
    assert m.warnings() == []
    assert not any("reserve_mem" in t for t in texts(m))
    assert len(m.ignored) == 1 and m.ignored[0].startswith("reserve_mem=")


def test_reserve_mem_duplicate_and_too_many_are_silent():
    dup = boot("kho=on reserve_mem=1M:4K:a reserve_mem=1M:4K:a")
    assert [r.name for r in dup.reserve_mem] == ["a"]
    assert dup.warnings() == []
    assert len(dup.ignored) == 1
    many = boot("kho=on " + " ".join(f"reserve_mem=1M:4K:r{i}" for i in range(9)))
    assert [r.name for r in many.reserve_mem] == [f"r{i}" for i in range(8)]
    assert many.warnings() == []
    assert len(many.ignored) == 1


def test_reserve_mem_name_of_15_chars_and_small_align():
    m = boot("kho=on reserve_mem=1M:0:abcdefghijklmno")
    (r,) = m.reserve_mem
    assert r.name == "abcdefghijklmno"
    assert r.size == MIB
    assert r.align == 64          # raised to SMP_CACHE_BYTES


def test_reserve_mem_dash_spelling():
    # obsolete_checksetup matches __setup names with parameqn().
    m = boot("kho=on reserve-mem=4M:4K:foo")
    assert [r.name for r in m.reserve_mem] == ["foo"]
