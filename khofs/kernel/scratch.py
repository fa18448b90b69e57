"""Scratch areas: `kho_scratch=` parsing, sizing and placement, and the kho_scratch array."""

import errno
import struct
from dataclasses import dataclass

from .cmdline import cmdline_bytes
from .errors import KernelError
from .kstrtox import _show, kstrtouint, memparse, U64_MASK
from .physmem import (ARCH_LOW_ADDRESS_LIMIT, CMA_MIN_ALIGNMENT_BYTES, MEMBLOCK_ALLOC_ANYWHERE,
                      NUMA_NO_NODE, PAGE_SIZE, Memblock)

KHO_SCRATCH = struct.Struct("<QQ")       # struct kho_scratch { phys_addr_t addr, size; }


def kround_up(x: int, a: int) -> int:
    """round_up() on a u64, wrapping like the kernel's macro (a slightly negative size gives 0)."""
    return ((((x - 1) & U64_MASK) | (a - 1)) + 1) & U64_MASK


@dataclass
class ScratchConfig:
    """kho_scratch= as parsed: a scale or explicit sizes."""
    scale: int = 200            # percent; 0 = explicit sizes
    lowmem: int = 0
    global_: int = 0
    pernode: int = 0


def parse_kho_scratch(val, cfg: ScratchConfig, strict: bool) -> str:
    """kho_parse_scratch_size. Updates cfg only on success; returns the kernel's notice line.

    strict (6.18): zeros allowed if the sum is non-zero, trailing text rejected.
    lenient (6.16): every size must be non-zero, trailing text ignored.
    """
    if val is None or val == "":
        raise KernelError(errno.EINVAL, "kho_scratch needs a value")
    p = cmdline_bytes(val) if isinstance(val, str) else val
    if p.endswith(b"%"):
        if len(p) > 11:
            raise KernelError(errno.EINVAL, "scale has more than 10 digits")
        cfg.scale = kstrtouint(p[:-1], 10)
        # pr_notice prints the unsigned scale with %d.
        return f"scratch scale is {cfg.scale - (1 << 32) if cfg.scale >= 1 << 31 else cfg.scale}%"
    sizes = []
    pos = 0
    for i in range(3):
        if i > 0:
            if p[pos:pos + 1] != b",":
                raise KernelError(errno.EINVAL, "expected three sizes separated by ','")
            pos += 1
        v, n = memparse(p[pos:])
        if n == 0 or (not strict and v == 0):
            raise KernelError(errno.EINVAL, f"bad size {_show(p[pos:pos + 12])} (expected e.g. 16M)")
        sizes.append(v)
        pos += n
    if strict:
        if not (sum(sizes) & U64_MASK):
            raise KernelError(errno.EINVAL, "all scratch sizes are zero")
        if pos != len(p):
            raise KernelError(errno.EINVAL, f"unexpected {_show(p[pos:])} after the third size")
    cfg.lowmem, cfg.global_, cfg.pernode = sizes
    cfg.scale = 0
    return (f"scratch areas: lowmem: {sizes[0] >> 20}MiB global: {sizes[1] >> 20}MiB "
            f"pernode: {sizes[2] >> 20}MiB")


def reserve_scratch(memblock: Memblock, cfg: ScratchConfig):
    """kho_reserve_scratch: returns (array phys, [(addr, size), ...]) or None on failure."""
    if cfg.scale:
        size = memblock.reserved_kern_size(ARCH_LOW_ADDRESS_LIMIT, NUMA_NO_NODE) * cfg.scale // 100
        lowmem = kround_up(size & U64_MASK, CMA_MIN_ALIGNMENT_BYTES)
        size = memblock.reserved_kern_size(MEMBLOCK_ALLOC_ANYWHERE, NUMA_NO_NODE) * cfg.scale // 100
        global_ = kround_up((size - lowmem) & U64_MASK, CMA_MIN_ALIGNMENT_BYTES)
    else:
        lowmem, global_ = cfg.lowmem, cfg.global_
    nodes = len(memblock.mem.nodes)
    cnt = nodes + 2
    array = memblock.phys_alloc(cnt * KHO_SCRATCH.size, PAGE_SIZE)
    if not array:
        return None
    regions = []

    def undo():
        for a, s in reversed(regions):
            memblock.free(a, s)
        memblock.free(array, cnt * KHO_SCRATCH.size)

    addr = memblock.alloc_range_nid(lowmem, CMA_MIN_ALIGNMENT_BYTES, 0, ARCH_LOW_ADDRESS_LIMIT)
    if not addr:
        undo()
        return None
    regions.append((addr, lowmem))
    addr = memblock.phys_alloc(global_, CMA_MIN_ALIGNMENT_BYTES)
    if not addr:
        undo()
        return None
    regions.append((addr, global_))
    for nid in range(nodes):
        if cfg.scale:
            size = memblock.reserved_kern_size(MEMBLOCK_ALLOC_ANYWHERE, nid) * cfg.scale // 100
        else:
            size = cfg.pernode
        size = kround_up(size & U64_MASK, CMA_MIN_ALIGNMENT_BYTES)
        addr = memblock.alloc_range_nid(size, CMA_MIN_ALIGNMENT_BYTES, 0, MEMBLOCK_ALLOC_ANYWHERE,
                                        nid, exact_nid=True)
        if not addr:
            undo()
            return None
        regions.append((addr, size))
    return array, regions


def encode_scratch(regions) -> bytes:
    """The kho_scratch array the next kernel reads: (addr, size) u64 pairs."""
    return b"".join(KHO_SCRATCH.pack(a, s) for a, s in regions)


def decode_scratch(data: bytes):
    """The (addr, size) pairs of a kho_scratch array."""
    return [KHO_SCRATCH.unpack_from(data, i) for i in range(0, len(data) - len(data) % 16, 16)]


def format_lines(values) -> bytes:
    """scratch_phys / scratch_len: one "0x%llx\\n" line per region."""
    return "".join(f"0x{v:x}\n" for v in values).encode()
