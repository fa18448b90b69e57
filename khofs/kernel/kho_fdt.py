"""The KHO root FDT as each release builds it: made at boot (6.19+) and edited in place as
subtrees come and go. The profile says which compatible and child properties it carries."""

import errno
import struct

import libfdt

from .errors import KernelError
from .fdt import PageFdtSw, fdt_errno, u64
from .physmem import PAGE_SIZE
from .profile import Profile

PROP_PRESERVED_MEMORY_MAP = "preserved-memory-map"
PROP_SUB_FDT = "fdt"
PROP_BLOB_SIZE = "blob-size"
KHO_METADATA_NODE_NAME = "kexec-metadata"
KHO_KEXEC_METADATA_VERSION = 1
KEXEC_METADATA = struct.Struct("<I65sI")       # packed: version, previous_release, kexec_count


def new_root_fdt(profile: Profile, map_phys: int) -> bytearray:
    """kho_out_fdt_setup (6.19+): the root FDT made at boot in its page, with the map's
    address (7.1: the radix root; 7.0: 0 until a finalize)."""
    sw = PageFdtSw(PAGE_SIZE)
    sw.finish_reservemap()
    sw.begin_node("")
    sw.property_string("compatible", profile.compatible)
    sw.property(PROP_PRESERVED_MEMORY_MAP, u64(map_phys))
    sw.end_node()
    return sw.finish()


def add_subtree_in_place(buf: bytearray, profile: Profile, name: str, phys: int,
                         size: int | None) -> "KernelError | None":
    """6.19+ kho_add_subtree's edit of a root FDT page (fdt_open_into, fdt_add_subnode,
    fdt_setprop, fdt_pack): children end up newest first. The kernel's error, if any; as
    in the kernel, a failing setprop leaves the node in the FDT."""
    if libfdt.fdt_open_into(buf, buf, PAGE_SIZE) < 0:
        return KernelError(errno.ENOMEM, "the root FDT cannot be opened")
    err = None
    off = libfdt.fdt_add_subnode(buf, 0, name)
    if off < 0:
        err = KernelError(errno.EEXIST if off == -libfdt.EXISTS else errno.ENOMEM,
                          f"subtree {name!r}: {libfdt.fdt_strerror(off)}")
    else:
        props = [(profile.sub_prop, u64(phys))]
        if profile.blob_size:
            props.append((PROP_BLOB_SIZE, u64(size)))
        for pname, val in props:
            ret = libfdt.fdt_setprop(buf, off, pname, val, len(val))
            if ret < 0:
                err = KernelError(fdt_errno(ret), f"subtree {name!r}: {libfdt.fdt_strerror(ret)}")
                break
    libfdt.fdt_pack(buf)
    return err
