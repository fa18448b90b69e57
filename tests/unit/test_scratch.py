"""kho_scratch= parsing, scratch sizing and placement (KHO-SPEC §3, §6, §10; facts Q1-Q3)."""

import dataclasses
import errno
import struct

import pytest
from hypothesis import given, strategies as st

from khofs.kernel.errors import KernelError
from khofs.kernel.machine import Machine, MachineConfig
from khofs.kernel.scratch import (ScratchConfig, decode_scratch, encode_scratch, format_lines,
                                  kround_up, parse_kho_scratch)

K, M, G = 1 << 10, 1 << 20, 1 << 30
SZ_2M = 2 * M
U64 = (1 << 64) - 1
FAIL_LINE = "KHO: Failed to reserve scratch area, disabling kexec handover"


def boot(cmdline, abi="6.18", **cfg):
    cfg.setdefault("memory", G)
    return Machine(cmdline, MachineConfig(abi=abi, **cfg))


def parse(val, strict):
    cfg = ScratchConfig()
    parse_kho_scratch(val, cfg, strict)
    return cfg


def parse_err(val, strict):
    cfg = ScratchConfig()
    before = dataclasses.replace(cfg)
    with pytest.raises(KernelError) as ei:
        parse_kho_scratch(val, cfg, strict)
    assert cfg == before          # nothing assigned on failure
    return ei.value.errno


# -- parsing: triple form --------------------------------------------------------------------

@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("val,sizes", [
    ("16M,512M,256M", (16 * M, 512 * M, 256 * M)),       # the documentation's example
    ("16M,64M,16M", (16 * M, 64 * M, 16 * M)),
    ("1g,2m,3k", (G, 2 * M, 3 * K)),
    ("010M,0x10M,0x1E", (8 * M, 16 * M, 30)),
    ("1T,1P,1E", (1 << 40, 1 << 50, 1 << 60)),
    ("4096,8192,1", (4096, 8192, 1)),
])
def test_triple_accepted_by_both(val, sizes, strict):
    cfg = parse(val, strict)
    assert (cfg.lowmem, cfg.global_, cfg.pernode) == sizes
    assert cfg.scale == 0


@pytest.mark.parametrize("val,sizes", [
    ("0,1G,1G", (0, G, G)),
    ("K,1G,1G", (0, G, G)),          # a bare suffix parses as 0 but consumes a char
    ("1G,0,0", (G, 0, 0)),
    ("0x0,M,1", (0, 0, 1)),
])
def test_strict_allows_zeros_with_nonzero_sum(val, sizes):
    cfg = parse(val, True)
    assert (cfg.lowmem, cfg.global_, cfg.pernode) == sizes
    assert parse_err(val, False) == errno.EINVAL


@pytest.mark.parametrize("val", ["1G,1G,1Gfoo", "1G,1G,1G,5G", "1G,1G,1G ", "1G,1G,1G%x"])
def test_trailing_text_strict_rejects_lenient_ignores(val):
    assert parse_err(val, True) == errno.EINVAL
    cfg = parse(val, False)
    assert (cfg.lowmem, cfg.global_, cfg.pernode) == (G, G, G)


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("val", ["0,0,0", "K,M,G", "1G,1G", "1G", ",1G,1G", "1G,,1G",
                                 "1G;1G;1G", "1KB,1M,1M", "1G ,1G,1G", "+1G,1G,1G", "abc", ""])
def test_triple_rejected_by_both(val, strict):
    assert parse_err(val, strict) == errno.EINVAL


@pytest.mark.parametrize("strict", [True, False])
def test_none_rejected(strict):
    assert parse_err(None, strict) == errno.EINVAL


def test_notice_line():
    msg = parse_kho_scratch("16M,512M,256M", ScratchConfig(), True)
    assert msg == "scratch areas: lowmem: 16MiB global: 512MiB pernode: 256MiB"


# -- parsing: percent form ----------------------------------------------------------------------

@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("val,scale", [
    ("200%", 200), ("0%", 0), ("+50%", 50), ("050%", 50), ("50\n%", 50),
    ("4294967295%", 0xFFFFFFFF), ("0000000001%", 1),
])
def test_percent_accepted(val, scale, strict):
    cfg = ScratchConfig(scale=7, lowmem=1, global_=2, pernode=3)
    msg = parse_kho_scratch(val, cfg, strict)
    assert cfg == ScratchConfig(scale=scale, lowmem=1, global_=2, pernode=3)
    assert msg.startswith("scratch scale is ")


def test_percent_notice_prints_with_signed_format():
    # pr_notice("scratch scale is %d%%\n", scratch_scale): an unsigned int through %d.
    assert parse_kho_scratch("50%", ScratchConfig(), True) == "scratch scale is 50%"
    assert parse_kho_scratch("4294967295%", ScratchConfig(), True) == "scratch scale is -1%"


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("val,err", [
    ("%", errno.EINVAL), ("-1%", errno.EINVAL), (" 50%", errno.EINVAL), ("0x10%", errno.EINVAL),
    ("5 0%", errno.EINVAL), ("12345678901%", errno.EINVAL),   # more than 10 characters
    ("00000000001%", errno.EINVAL), ("4294967296%", errno.ERANGE),
])
def test_percent_rejected(val, err, strict):
    assert parse_err(val, strict) == err


# -- round_up and the kho_scratch array ----------------------------------------------------------

@pytest.mark.parametrize("x,result", [
    (0, 0), (1, SZ_2M), (SZ_2M, SZ_2M), (SZ_2M + 1, 2 * SZ_2M),
    ((-1) & U64, 0), ((-M) & U64, 0), ((-SZ_2M) & U64, (-SZ_2M) & U64),
    ((-SZ_2M - 1) & U64, (-SZ_2M) & U64),
])
def test_kround_up_wraps_like_the_macro(x, result):
    assert kround_up(x, SZ_2M) == result


def test_encode_scratch_layout():
    data = encode_scratch([(0x3EA00000, 0x1000000), (0, 0), (1 << 63, U64)])
    assert data == (struct.pack("<QQ", 0x3EA00000, 0x1000000) + bytes(16)
                    + bytes.fromhex("0000000000000080") + b"\xff" * 8)


regions = st.lists(st.tuples(st.integers(0, U64), st.integers(0, U64)), max_size=8)


@given(regions, st.binary(max_size=15))
def test_scratch_array_roundtrip(regs, tail):
    data = encode_scratch(regs)
    assert len(data) == 16 * len(regs)
    # The next kernel takes len / 16 entries, a partial one is dropped.
    assert decode_scratch(data + tail) == [tuple(r) for r in regs]


def test_format_lines():
    assert format_lines([0, 0x1000000, 0xABCDEF0]) == b"0x0\n0x1000000\n0xabcdef0\n"
    assert format_lines([]) == b""


# -- sizing and placement at boot ------------------------------------------------------------------

def spans(m):
    return [(a, a + s) for a, s in m.scratch]


def test_explicit_16m_64m_16m_placement():
    m = boot("kho=on kho_scratch=16M,64M,16M reserve_mem=4M:4K:foo")
    assert m.scratch_len_text() == b"0x1000000\n0x4000000\n0x1000000\n"
    low, glob, node = spans(m)
    for start, _ in (low, glob, node):
        assert start % SZ_2M == 0
    assert glob[1] == low[0]          # top-down and adjacent: lowmem, global, node
    assert node[1] == glob[0]
    (r,) = m.reserve_mem
    assert r.start >= low[1]          # reserve_mem was allocated earlier, above
    assert m.scratch_phys_text() == "".join(f"0x{a:x}\n" for a, _ in m.scratch).encode()


def test_docs_example_sizes():
    m = boot("kho=on kho_scratch=16M,512M,256M", memory=4 * G)
    assert m.scratch_len_text() == b"0x1000000\n0x20000000\n0x10000000\n"


def test_lowmem_below_4g():
    m = boot("kho=on kho_scratch=16M,64M,16M", memory=8 * G)
    low, glob, node = spans(m)
    # memblock_phys_alloc_range(.., 0, ARCH_LOW_ADDRESS_LIMIT = 4G - 1), top-down, 2 MiB aligned
    assert low == (4 * G - 18 * M, 4 * G - 2 * M)
    assert glob[1] > 4 * G


def test_explicit_lowmem_global_not_rounded_pernode_rounded():
    m = boot("kho=on kho_scratch=1M,3M,1M")
    assert m.scratch_len_text() == b"0x100000\n0x300000\n0x200000\n"
    for a, _ in m.scratch:
        assert a % SZ_2M == 0


def test_default_scale_on_1g_machine():
    m = boot("kho=on", boot_reserved=38 * M)
    (low_a, low), (glob_a, glob), (node_a, node) = m.scratch
    assert low == 76 * M
    assert glob == 0
    # The node's share is computed after lowmem was reserved and counts it.
    assert 2 * (38 + 76) * M <= node < 2 * (38 + 76) * M + SZ_2M + 1
    assert node % SZ_2M == 0
    assert m.scratch_len_text().split(b"\n")[1] == b"0x0"


def test_scaled_global_wraps_to_zero():
    # 200% of 37.5 MiB = 75 MiB; lowmem rounds to 76 MiB; 75 - 76 wraps, round_up gives 0.
    m = boot("kho=on", boot_reserved=37 * M + 512 * K)
    assert m.scratch[0][1] == 76 * M
    assert m.scratch[1][1] == 0


def test_percent_scale_applies():
    m = boot("kho=on kho_scratch=100%", boot_reserved=38 * M)
    assert m.scratch[0][1] == 38 * M
    assert m.scratch[1][1] == 0


@pytest.mark.parametrize("abi", ["6.18", "6.16"])
def test_zero_percent_gives_zero_sized_regions(abi):
    # Size-0 memblock allocations succeed: KHO stays on with {addr, 0} entries.
    m = boot("kho=on kho_scratch=0%", abi=abi)
    assert m.kho_out is not None
    assert m.scratch_len_text() == b"0x0\n0x0\n0x0\n"


def test_strict_zero_lowmem_boots():
    m = boot("kho=on kho_scratch=0,64M,16M")
    assert m.kho_out is not None
    assert m.scratch_len_text() == b"0x0\n0x4000000\n0x1000000\n"


def test_lenient_zero_lowmem_is_malformed():
    m = boot("kho=on kho_scratch=0,64M,16M", abi="6.16", boot_reserved=38 * M)
    assert "Malformed early option 'kho_scratch'" in [line.text for line in m.dmesg]
    assert m.scratch[0][1] == 76 * M


def test_two_numa_nodes_four_lines():
    m = boot("kho=on kho_scratch=16M,64M,16M", memory=2 * G, nodes=2)
    assert m.scratch_len_text() == b"0x1000000\n0x4000000\n0x1000000\n0x1000000\n"
    assert len(m.scratch_phys_text().splitlines()) == 4
    for nid, (a, s) in enumerate(m.scratch[2:]):
        lo, hi = m.mem.nodes[nid]
        assert lo <= a and a + s <= hi


def test_two_numa_nodes_default_scale():
    m = boot("kho=on", memory=2 * G, nodes=2)
    assert len(m.scratch) == 4
    for nid, (a, s) in enumerate(m.scratch[2:]):
        lo, hi = m.mem.nodes[nid]
        assert lo <= a and a + s <= hi
        assert a % SZ_2M == 0 and s % SZ_2M == 0


def test_scratch_that_does_not_fit_disables_kho_6_18():
    m = boot("kho=on kho_scratch=2G,1G,1G")
    assert m.kho_out is None
    assert m.kho_enable is False
    assert FAIL_LINE in [line.text for line in m.warnings()]


def test_scratch_that_does_not_fit_disables_kho_silently_6_16():
    m = boot("kho=on kho_scratch=2G,1G,1G", abi="6.16")
    assert m.kho_out is None
    assert not any("Failed to reserve scratch" in line.text for line in m.dmesg)


def test_failed_node_scratch_frees_earlier_areas():
    # lowmem and global fit, the node area does not: everything is given back.
    before = boot("kho=off").memblock.reserved.total()
    m = boot("kho=on kho_scratch=64M,64M,2G")
    assert m.kho_out is None
    assert m.memblock.reserved.total() == before


def test_kho_scratch_ignored_after_kho_kexec():
    old = boot("kho=on kho_scratch=16M,64M,16M")
    old.kho_out.set_finalize(1)
    old.kexec_load(cmdline="kho=on kho_scratch=32M,32M,32M")
    ho = old.kexec_exec()
    new = Machine(ho.cmdline, MachineConfig(**ho.config), handover=ho)
    assert new.kho_in is not None
    assert new.scratch == old.scratch
    assert new.scratch_len_text() == b"0x1000000\n0x4000000\n0x1000000\n"
    assert new.scratch_phys_text() == old.scratch_phys_text()
