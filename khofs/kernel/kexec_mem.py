"""Where kexec_file_load puts an image's segments: with KHO on, only inside scratch areas.

kexec_locate_mem_hole hands the search to kho_locate_mem_hole when KHO is enabled, which
tries the scratch areas one by one and places each buffer top-down in the first that has
room; without KHO any free memory will do.
"""

from .physmem import PAGE_SIZE

# The x86 purgatory and its stack: not in any image file, its size is inferred (docs/run.md).
PURGATORY_SIZE = 24 << 10
BOOT_PARAMS_SIZE = PAGE_SIZE      # struct boot_params
MIN_KERNEL_ALIGN = 2 << 20        # x86 CONFIG_PHYSICAL_ALIGN's usual value


def _align_up(v: int, a: int) -> int:
    return (v + a - 1) // a * a


def place(areas, sizes_aligns) -> list[int] | None:
    """Addresses for [(size, align), ...] placed top-down in areas [(addr, size), ...],
    none overlapping; None when one finds no room (the kernel's EADDRNOTAVAIL)."""
    free = [[a, a + s] for a, s in areas]
    out = []
    for size, align in sizes_aligns:
        memsz = _align_up(max(size, 1), PAGE_SIZE)
        for area in free:
            top = area[1] - memsz
            cand = top - top % align
            if cand >= area[0]:
                out.append(cand)
                area[1] = cand           # later buffers go below it
                break
        else:
            return None
        continue
    return out


def image_segments(kernel_len: int, kern16_size: int, initrd_len: int | None,
                   cmdline_len: int) -> list[tuple[int, int]]:
    """The segments bzImage64_load adds, as (size, align): purgatory, boot params with the
    command line, the initrd, and the protected-mode kernel."""
    segs = [(PURGATORY_SIZE, PAGE_SIZE), (BOOT_PARAMS_SIZE + cmdline_len, PAGE_SIZE)]
    if initrd_len:
        segs.append((initrd_len, PAGE_SIZE))
    segs.append((max(kernel_len - kern16_size, 1), MIN_KERNEL_ALIGN))
    return segs
