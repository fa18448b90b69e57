"""FDT bytes the kernel's way: libfdt's sequential-write API (pylibfdt) into one fixed buffer."""

import struct

import libfdt

from .errors import KernelError
from .physmem import PAGE_SIZE

FDT_HEADER = struct.Struct(">10I")


def fdt_errno(err: int) -> int:
    """A libfdt error returned as a kernel int surfaces as errno = |FDT_ERR_*|."""
    return -err if err < 0 else err


class PageFdtSw(libfdt.FdtSw):
    """FdtSw over a fixed buffer: running out of room is -FDT_ERR_NOSPACE, as in the kernel."""

    def __init__(self, size: int = PAGE_SIZE):
        super().__init__(size)

    def check_space(self, val):
        """Out of room is the libfdt error as a KernelError, never a resize."""
        if val < 0:
            raise KernelError(fdt_errno(val), f"libfdt: {libfdt.fdt_strerror(val)}")
        return False

    def finish(self) -> bytearray:
        """fdt_finish: the whole buffer, as the page holds it afterwards."""
        buf = bytearray(self._fdt)
        err = libfdt.fdt_finish(buf)
        if err < 0:
            raise KernelError(fdt_errno(err), f"libfdt: {libfdt.fdt_strerror(err)}")
        return buf


def u64(v: int) -> bytes:
    """Native-endian (little-endian) u64 property payload."""
    return struct.pack("<Q", v)


def totalsize(blob) -> int:
    """The header's totalsize of an FDT blob."""
    return struct.unpack_from(">I", blob, 4)[0]


def _ro(blob) -> bytearray:
    """A copy libfdt can read safely: a header claiming more bytes than we hold is clamped, so
    lookups fail as truncated instead of reading past the buffer (the kernel would read on
    into whatever memory follows)."""
    buf = bytearray(blob)
    if len(buf) >= 8 and totalsize(buf) > len(buf):
        struct.pack_into(">I", buf, 4, len(buf))
    return buf


def check_header(blob) -> int:
    """fdt_check_header: 0 or a negative libfdt error."""
    if len(blob) < FDT_HEADER.size:
        return -libfdt.TRUNCATED
    try:
        return libfdt.fdt_check_header(bytearray(blob))
    except Exception:       # pylibfdt raises for some malformed inputs
        return -libfdt.BADSTRUCTURE


def node_check_compatible(blob, offset: int, compat: str) -> int:
    """fdt_node_check_compatible: 0 match, 1 no match, negative libfdt error."""
    return libfdt.fdt_node_check_compatible(_ro(blob), offset, compat)


def getprop(blob, offset: int, name: str):
    """bytes of a property, or None."""
    try:
        prop = libfdt.Fdt(_ro(blob)).getprop(offset, name, (libfdt.NOTFOUND,))
    except libfdt.FdtException:
        return None
    return None if isinstance(prop, int) else bytes(prop)


def subnodes(blob, offset: int = 0):
    """(name, offset) of each child node; a malformed tree ends the list, as
    fdt_for_each_subnode() stops at the first error."""
    out = []
    try:
        f = libfdt.Fdt(_ro(blob))
        child = f.first_subnode(offset, (libfdt.NOTFOUND,))
        while child >= 0:
            out.append((f.get_name(child), child))
            child = f.next_subnode(child, (libfdt.NOTFOUND,))
    except libfdt.FdtException:
        pass
    return out


def prop_value_offset(blob, node: int, name: str) -> int:
    """Byte offset in the blob of a property's value (where fdt_property_placeholder points)."""
    f = libfdt.Fdt(_ro(blob))
    off = f.first_property_offset(node, (libfdt.NOTFOUND,))
    while off >= 0:
        prop = f.get_property_by_offset(off)
        if prop.name == name:
            return f.off_dt_struct() + off + 12     # fdt_property header: tag, len, nameoff
        off = f.next_property_offset(off, (libfdt.NOTFOUND,))
    raise KeyError(name)


def tree(blob, offset: int = 0, depth: int = 0) -> dict:
    """{"name", "props": [(name, bytes)], "children": [...]} of a node, via libfdt."""
    f = libfdt.Fdt(_ro(blob))
    name = f.get_name(offset) if offset else ""
    props = []
    off = f.first_property_offset(offset, (libfdt.NOTFOUND,))
    while off >= 0:
        p = f.get_property_by_offset(off)
        props.append((p.name, bytes(p)))
        off = f.next_property_offset(off, (libfdt.NOTFOUND,))
    children = []
    if depth < 32:
        child = f.first_subnode(offset, (libfdt.NOTFOUND,))
        while child >= 0:
            children.append(tree(blob, child, depth + 1))
            child = f.next_subnode(child, (libfdt.NOTFOUND,))
    return {"name": name, "props": props, "children": children}
