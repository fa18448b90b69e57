"""kho_in: the incoming handover as the next kernel validates and uses it (kho_populate etc.)."""

import errno
from dataclasses import dataclass, field

from .errors import KernelError
from .fdt import check_header, getprop, node_check_compatible, subnodes, totalsize
from .kho_fdt import KEXEC_METADATA, KHO_KEXEC_METADATA_VERSION, KHO_METADATA_NODE_NAME, \
    PROP_BLOB_SIZE, PROP_PRESERVED_MEMORY_MAP
from .memtrack import MapError, walk_memory_map
from .physmem import PAGE_SIZE, PhysMem
from .profile import DEFAULT_PROFILE, Profile, get_profile
from .radix import walk_radix_map
from .scratch import decode_scratch

DEFAULT = get_profile(DEFAULT_PROFILE)


@dataclass
class KhoIn:
    """The incoming side of KHO: the handed-over FDT, scratch and what it says."""
    fdt_phys: int
    scratch_phys: int
    scratch: list
    blobs: list = field(default_factory=list)     # in/sub_fdts entries
    profile: Profile = DEFAULT
    kexec_count: int = 0                          # 7.1: from the kexec-metadata blob
    previous_release: str | None = None


def _map_phys(fdt, profile: Profile, log):
    """kho_get_mem_map_phys: the map's address, or 0 (with the kernel's error if missing)."""
    prop = getprop(fdt, 0, PROP_PRESERVED_MEMORY_MAP)
    if prop is None or len(prop) != 8:
        log(profile.map_error_line)
        return 0
    return int.from_bytes(prop, "little")


def kho_populate(mem: PhysMem, fdt_phys: int, scratch_phys: int, scratch_len: int, log,
                 profile: Profile = DEFAULT):
    """Validate the handover like kho_populate(); returns KhoIn or None (revival disabled)."""
    err = 0
    compat = profile.compatible
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
        ret = node_check_compatible(fdt, 0, compat)
        if ret:
            log(f"KHO: setup: handover FDT (0x{fdt_phys:x}) is incompatible with "
                f"'{compat}': {ret}")
            err = -errno.EINVAL
            return None
        if profile.fdt_at_boot and not _map_phys(fdt, profile, log):
            # 6.19+: a map of 0 (never finalized) or none at all is no handover.
            err = -errno.ENOENT
            return None
        if scratch_phys is None or scratch_phys + scratch_len > mem.size:
            log(f"KHO: setup: failed to memremap scratch (phys=0x{scratch_phys or 0:x}, "
                f"len={scratch_len})")
            err = -errno.EFAULT
            return None
        scratch = decode_scratch(mem.read(scratch_phys, scratch_len))
        log(profile.found_line)
        return KhoIn(fdt_phys, scratch_phys, scratch, profile=profile)
    finally:
        if err:
            log(profile.revival_line(err))


def preserved_runs(mem: PhysMem, fdt_phys: int, bits: int, log=None, profile: Profile = DEFAULT):
    """kho_mem_deserialize / kho_mem_retrieve: the preserved (order, phys, size) runs.

    Raises MapError for a radix tree the kernel could not walk; a chunk list that cannot
    be read gives [] with a khofs line, as before."""
    fdt = mem.read(fdt_phys, PAGE_SIZE)
    prop = getprop(fdt, 0, PROP_PRESERVED_MEMORY_MAP)
    if prop is None or len(prop) != 8:
        if log:
            log(profile.map_error_line)
        return []
    first = int.from_bytes(prop, "little")
    if profile.radix:
        return list(walk_radix_map(mem, first))
    try:
        return list(walk_memory_map(mem, first, bits))
    except MapError as e:
        if log:
            log(f"khofs: memory map unreadable: {e}")
        return []


def sub_fdt_entries(mem: PhysMem, fdt_phys: int, log, profile: Profile = DEFAULT):
    """kho_in_debugfs_init: one blob per root child with a valid subtree property."""
    fdt = mem.read(fdt_phys, PAGE_SIZE)
    if fdt_phys + totalsize(fdt) > mem.size:
        # in/fdt is a blob of the header's totalsize at fdt_phys, as the kernel makes it.
        log(f"khofs: in/fdt at 0x{fdt_phys:x} ({totalsize(fdt)} bytes, as its header says) "
            "runs past the end of memory: reading beyond it fails with EFAULT (a real kernel "
            "would fault)")
    prop_name = profile.sub_prop
    out = []
    for name, off in subnodes(fdt, 0):
        prop = getprop(fdt, off, prop_name)
        if prop is None:
            continue
        if len(prop) != 8:
            log(profile.bad_sub_prop_line.format(name=name, prop=prop_name, len=len(prop)))
            continue
        phys = int.from_bytes(prop, "little")
        if profile.blob_size:
            bs = getprop(fdt, off, PROP_BLOB_SIZE)
            if bs is None or len(bs) != 8:
                log(f"KHO: node {name} missing or invalid {PROP_BLOB_SIZE} property")
                continue
            size = int.from_bytes(bs, "little")
        else:
            size = totalsize(mem.read(phys, 8)) if phys + 8 <= mem.size else 0
        if phys + max(size, 8) > mem.size:
            log(f"khofs: sub-blob '{name}' at 0x{phys:x} ({size} bytes) runs past the end of "
                "memory: reading beyond it fails with EFAULT (a real kernel would fault)")
        out.append((name, phys, size))
    return out


def retrieve_subtree(kho_in: "KhoIn | None", mem: PhysMem, name: str, log=None):
    """kho_retrieve_subtree: phys of the named sub-blob; (phys, size) with blob-size."""
    if kho_in is None:
        raise KernelError(errno.ENOENT, "no handover")
    profile = kho_in.profile
    fdt = mem.read(kho_in.fdt_phys, PAGE_SIZE)
    for child, off in subnodes(fdt, 0):
        if child == name:
            prop = getprop(fdt, off, profile.sub_prop)
            if prop is None or len(prop) != 8:
                raise KernelError(errno.EINVAL, f"subtree {name!r} has no valid "
                                  f"{profile.sub_prop} property")
            phys = int.from_bytes(prop, "little")
            if not profile.blob_size:
                return phys
            bs = getprop(fdt, off, PROP_BLOB_SIZE)
            if bs is None or len(bs) != 8:
                if log:
                    log(f"KHO: broken KHO subnode '{name}': missing or invalid blob-size property")
                raise KernelError(errno.EINVAL, f"subtree {name!r} has no valid blob-size")
            return phys, int.from_bytes(bs, "little")
    raise KernelError(errno.ENOENT, f"no subtree {name!r}")


def retrieve_subtree_phys(kho_in: "KhoIn | None", mem: PhysMem, name: str, log=None) -> int:
    """kho_retrieve_subtree for a caller that wants no size: the named sub-blob's phys."""
    found = retrieve_subtree(kho_in, mem, name, log)
    return found[0] if isinstance(found, tuple) else found


def kexec_metadata_in(kho_in: KhoIn, mem: PhysMem, log) -> None:
    """kho_in_kexec_metadata: the previous kernel's release and count, with its checks."""
    try:
        phys, size = retrieve_subtree(kho_in, mem, KHO_METADATA_NODE_NAME, log)
    except KernelError:
        return              # the previous kernel did not export metadata
    if size < 4:
        log(f"KHO: kexec-metadata blob too small ({size} bytes)")
        return
    if phys + 4 > mem.size:
        log(f"khofs: kexec-metadata at 0x{phys:x} is outside memory; a real kernel would fault")
        return
    version = int.from_bytes(mem.read(phys, 4), "little")
    if version != KHO_KEXEC_METADATA_VERSION:
        log(f"KHO: kexec-metadata version {version} not supported "
            f"(expected {KHO_KEXEC_METADATA_VERSION})")
        return
    if size < KEXEC_METADATA.size:
        log(f"KHO: kexec-metadata blob too small for v{version} ({size} < {KEXEC_METADATA.size})")
        return
    if phys + KEXEC_METADATA.size > mem.size:
        log(f"khofs: kexec-metadata at 0x{phys:x} is outside memory; a real kernel would fault")
        return
    _, rel, count = KEXEC_METADATA.unpack(mem.read(phys, KEXEC_METADATA.size))
    # strscpy into a 65-byte buffer: up to the first NUL, at most 64 bytes.
    kho_in.previous_release = rel[:64].split(b"\0")[0].decode(errors="replace")
    kho_in.kexec_count = count
    log(f"KHO: exec from: {kho_in.previous_release} (count {count})")
