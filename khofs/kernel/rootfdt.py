"""The whole 6.19+ root FDT from the start of it that debugfs shows.

From 6.19 out/fdt keeps the size the root FDT had when kho_init made the file, and the FDT
grows in its page as subtrees are added: on a real 7.1 kernel out/fdt reads 233 bytes of a
353-byte FDT. The kernel builds that FDT one way only: made at boot with `compatible` and
the map's address, then each subtree added in place, which puts it before the older ones.
So what debugfs cuts off is the oldest children and the strings. Their names and blobs are
in out/sub_fdts; their addresses are nowhere. rebuild() redoes the kernel's edits from
what is shown, leaves the addresses it could not see to the caller, and checks that the
result starts with exactly the bytes shown.
"""

import struct

from .fdt import FDT_HEADER, totalsize
from .kho import KHO_METADATA_NODE_NAME, add_subtree_in_place, new_root_fdt
from .profile import Profile

FDT_BEGIN_NODE, FDT_END_NODE, FDT_PROP, FDT_NOP, FDT_END = 1, 2, 3, 4, 9
U32 = struct.Struct(">I")


def _align4(n: int) -> int:
    return (n + 3) & ~3


def shown_nodes(prefix: bytes):
    """(root property values, [(child name, property values, whole)], a child name cut
    short or None) as far as the struct block goes in prefix."""
    off = FDT_HEADER.unpack_from(prefix)[2]
    root, kids, cut = [], [], None
    depth, pos, props = 0, off, root
    while pos + 4 <= len(prefix):
        tag = U32.unpack_from(prefix, pos)[0]
        if tag == FDT_BEGIN_NODE:
            end = prefix.find(b"\0", pos + 4)
            if end < 0:
                if depth == 1:
                    cut = prefix[pos + 4:].decode(errors="replace")
                break
            depth += 1
            if depth == 2:
                props = []
                kids.append([prefix[pos + 4:end].decode(errors="replace"), props, False])
            pos = _align4(end + 1)
        elif tag == FDT_PROP:
            if pos + 12 > len(prefix):
                break
            length = U32.unpack_from(prefix, pos + 4)[0]
            if pos + 12 + length > len(prefix):
                break
            props.append(prefix[pos + 12:pos + 12 + length])
            pos = _align4(pos + 12 + length)
        elif tag == FDT_END_NODE:
            if depth == 2:
                kids[-1][2] = True
            depth -= 1
            pos += 4
        elif tag == FDT_NOP:
            pos += 4
        else:
            break
    return root, [tuple(k) for k in kids], cut


def rebuild(prefix: bytes, blobs: dict, profile: Profile) -> tuple[bytes, list]:
    """(the whole root FDT, the children whose address was not shown: 0 in the FDT), or
    ValueError saying why the shown bytes do not allow it."""
    if len(prefix) < FDT_HEADER.size:
        raise ValueError("not even the FDT header is shown")
    root, kids, cut = shown_nodes(prefix)
    maps = [v for v in root if len(v) == 8]
    if len(maps) != 1:
        raise ValueError("the map's address is not among the bytes shown")
    nprops = 2 if profile.blob_size else 1
    seen = {}
    for name, values, whole in kids:
        if whole:
            if len(values) != nprops or any(len(v) != 8 for v in values):
                raise ValueError(f"child {name!r} does not carry the {profile.name} properties")
            seen[name] = int.from_bytes(values[-1], "little")  # 7.1: blob-size, preserved-data
    missing = [n for n in seen if n not in blobs]
    if missing:
        raise ValueError(f"out/sub_fdts/{missing[0]} is not in the recording")
    # The oldest first: 7.1's kexec-metadata is added in kho_init before anything else; a
    # child whose name is cut short is the newest of those not shown.
    unseen = sorted((n for n in blobs if n not in seen),
                    key=lambda n: (n != KHO_METADATA_NODE_NAME,
                                   cut is not None and n.startswith(cut), n))
    buf = new_root_fdt(profile, int.from_bytes(maps[0], "little"))
    for name in unseen + list(reversed(list(seen))):
        err = add_subtree_in_place(buf, profile, name, seen.get(name, 0), len(blobs[name]))
        if err is not None:
            raise ValueError(f"the kernel's edits fail on child {name!r}: {err.message}")
    whole = bytes(buf[:totalsize(buf)])
    if not whole.startswith(prefix):
        extra = f" with {', '.join(unseen)} as the children not shown" if unseen else ""
        raise ValueError(f"the kernel's edits{extra} do not give back the bytes shown")
    return whole, unseen
