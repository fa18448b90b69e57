"""kho_in: the incoming handover as the next kernel validates and uses it (kho_populate etc.)."""

import errno
from dataclasses import dataclass, field

from .errors import KernelError
from .fdt import check_header, getprop, node_check_compatible, subnodes, totalsize
from .kho import KHO_FDT_COMPATIBLE, PROP_PRESERVED_MEMORY_MAP, PROP_SUB_FDT, Blob
from .memtrack import MapError, walk_memory_map
from .physmem import PAGE_SIZE, PhysMem
from .scratch import decode_scratch


@dataclass
class KhoIn:
    fdt_phys: int
    scratch_phys: int
    scratch: list
    blobs: list = field(default_factory=list)     # in/sub_fdts entries
    fdt_blob: Blob | None = None


def kho_populate(mem: PhysMem, fdt_phys: int, scratch_phys: int, scratch_len: int, log):
    """Validate the handover like kho_populate(); returns KhoIn or None (revival disabled)."""
    err = 0
    try:
        if fdt_phys is None or fdt_phys % PAGE_SIZE or fdt_phys + PAGE_SIZE > mem.size:
            log(f"KHO: setup: failed to memremap FDT (0x{fdt_phys or 0:x})")
            err = -errno.EFAULT
            return None
        fdt = mem.read(fdt_phys, PAGE_SIZE)
        ret = check_header(fdt)
        if ret:
            log(f"KHO: setup: handover FDT (0x{fdt_phys:x}) is invalid: {ret}")
            err = -errno.EINVAL
            return None
        ret = node_check_compatible(fdt, 0, KHO_FDT_COMPATIBLE)
        if ret:
            log(f"KHO: setup: handover FDT (0x{fdt_phys:x}) is incompatible with "
                f"'{KHO_FDT_COMPATIBLE}': {ret}")
            err = -errno.EINVAL
            return None
        if scratch_phys is None or scratch_phys + scratch_len > mem.size:
            log(f"KHO: setup: failed to memremap scratch (phys=0x{scratch_phys or 0:x}, "
                f"len={scratch_len})")
            err = -errno.EFAULT
            return None
        scratch = decode_scratch(mem.read(scratch_phys, scratch_len))
        log("KHO: found kexec handover data. Will skip init for some devices")
        return KhoIn(fdt_phys, scratch_phys, scratch)
    finally:
        if err:
            log(f"KHO: disabling KHO revival: {err}")


def preserved_runs(mem: PhysMem, fdt_phys: int, bits: int, log=None):
    """kho_mem_deserialize: the preserved (order, phys, size) runs, or [] with the kernel's error."""
    fdt = mem.read(fdt_phys, PAGE_SIZE)
    prop = getprop(fdt, 0, PROP_PRESERVED_MEMORY_MAP)
    if prop is None or len(prop) != 8:
        if log:
            log("KHO: failed to get preserved memory bitmaps")
        return []
    first = int.from_bytes(prop, "little")
    try:
        return list(walk_memory_map(mem, first, bits))
    except MapError as e:
        if log:
            log(f"khofs: memory map unreadable: {e}")
        return []


def sub_fdt_entries(mem: PhysMem, fdt_phys: int, log):
    """kho_in_debugfs_init: one blob per root child whose `fdt` property is 8 bytes."""
    fdt = mem.read(fdt_phys, PAGE_SIZE)
    out = []
    for name, off in subnodes(fdt, 0):
        prop = getprop(fdt, off, PROP_SUB_FDT)
        if prop is None:
            continue
        if len(prop) != 8:
            log(f"KHO: node `{name}`'s prop `fdt` has invalid length: {len(prop)}")
            continue
        phys = int.from_bytes(prop, "little")
        size = totalsize(mem.read(phys, 8)) if phys + 8 <= mem.size else 0
        if phys + max(size, 8) > mem.size:
            log(f"khofs: sub-FDT '{name}' at 0x{phys:x} ({size} bytes) runs past the end of "
                "memory: reading beyond it fails with EFAULT (a real kernel would fault)")
        out.append((name, phys, size))
    return out


def retrieve_subtree(kho_in: "KhoIn | None", mem: PhysMem, name: str) -> int:
    """kho_retrieve_subtree: phys of the named sub-FDT."""
    if kho_in is None:
        raise KernelError(errno.ENOENT, "no handover")
    fdt = mem.read(kho_in.fdt_phys, PAGE_SIZE)
    for child, off in subnodes(fdt, 0):
        if child == name:
            prop = getprop(fdt, off, PROP_SUB_FDT)
            if prop is None or len(prop) != 8:
                raise KernelError(errno.EINVAL, f"subtree {name!r} has no valid fdt property")
            return int.from_bytes(prop, "little")
    raise KernelError(errno.ENOENT, f"no subtree {name!r}")
