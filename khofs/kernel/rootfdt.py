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

import itertools
import struct

from .fdt import FDT_HEADER, totalsize
from .kho_fdt import KHO_METADATA_NODE_NAME, add_subtree_in_place, new_root_fdt
from .profile import Profile

FDT_BEGIN_NODE, FDT_END_NODE, FDT_PROP, FDT_NOP, FDT_END = 1, 2, 3, 4, 9
U32 = struct.Struct(">I")
MAX_GUESS = 10          # files not shown, up to which subsets are tried (2^10 rebuilds)


def _align4(n: int) -> int:
    return (n + 3) & ~3


def shown_nodes(prefix: bytes):
    """(root property values, [[child name or None, name start, property values]]) as far as
    the struct block goes in prefix; only the last child can be cut short (name None when
    even its name is)."""
    off = FDT_HEADER.unpack_from(prefix)[2]
    root, kids = [], []
    depth, pos, props = 0, off, root
    while pos + 4 <= len(prefix):
        tag = U32.unpack_from(prefix, pos)[0]
        if tag == FDT_BEGIN_NODE:
            end = prefix.find(b"\0", pos + 4)
            if end < 0:
                if depth == 1:
                    kids.append([None, prefix[pos + 4:], []])
                break
            depth += 1
            if depth == 2:
                props = []
                kids.append([prefix[pos + 4:end], prefix[pos + 4:end], props])
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
            depth -= 1
            pos += 4
        elif tag == FDT_NOP:
            pos += 4
        else:
            break
    return root, kids


def _names(blobs) -> dict:
    """name as FDT bytes -> name; names libfdt cannot take are refused."""
    out = {}
    for n in blobs:
        try:
            out[n.encode()] = n
        except UnicodeError:
            raise ValueError(f"out/sub_fdts/{n.encode(errors='replace').decode()} has a name "
                             "that is not UTF-8, which no kernel node name is") from None
    return out


def rebuild(prefix: bytes, blobs: dict, profile: Profile, made=None) -> tuple[bytes, list]:
    """(the whole root FDT, the children whose address was not shown: 0 in the FDT), or
    ValueError saying why the shown bytes do not allow it. made: name -> creation time of
    its out/sub_fdts file, the order the kernel added the children in, where known."""
    if len(prefix) < FDT_HEADER.size:
        raise ValueError("not even the FDT header is shown")
    root, kids = shown_nodes(prefix)
    maps = [v for v in root if len(v) == 8]
    if len(maps) != 1:
        raise ValueError("the map's address is not among the bytes shown")
    names = _names(blobs)
    nprops = 2 if profile.blob_size else 1
    shown = []                      # (name, address or None), newest first
    for raw, start, values in kids:
        if raw is not None and raw not in names:
            raise ValueError(f"out/sub_fdts/{raw.decode(errors='replace')} is not in the "
                             "recording")
        if any(len(v) != 8 for v in values) or len(values) > nprops:
            raise ValueError(f"child {start.decode(errors='replace')!r} does not carry the "
                             f"{profile.name} properties")
        # 7.1: blob-size, then preserved-data (the address); 7.0: fdt.
        phys = int.from_bytes(values[-1], "little") if len(values) == nprops else None
        shown.append((names.get(raw), start, phys))
    # A child whose name is cut short is one of the files not named yet.
    last = shown[-1] if shown and shown[-1][0] is None else None
    named = [x for x in shown if x[0] is not None]
    taken = {n for n, _, _ in named}
    candidates = [None] if last is None else \
        [n for b, n in names.items() if b.startswith(last[1]) and n not in taken]
    if not candidates:
        raise ValueError("the child cut short is none of the out/sub_fdts files")
    tried = []
    for cand in candidates:
        order = named + ([(cand, b"", None)] if cand is not None else [])
        rest = [n for n in blobs if n not in {x[0] for x in order}]
        # The oldest first: by creation time where known, else 7.1's kexec-metadata (kho_init
        # adds it before anything else) and then by name.
        rest.sort(key=lambda n: (made[n], n) if made else (n != KHO_METADATA_NODE_NAME, n))
        # Every file not shown is a child, unless the header's sizes say fewer are: a file
        # that out/fdt does not name (a stray in a copy) is then left out.
        for k in range(len(rest), -1 if len(rest) <= MAX_GUESS else len(rest) - 1, -1):
            for some in itertools.combinations(rest, k):
                whole = _edits(profile, maps[0], blobs, list(some), order)
                unplaced = list(some) + [n for n, _, phys in order if phys is None]
                if whole.startswith(prefix):
                    return whole, unplaced
                tried.append(unplaced)
    extra = f" with {', '.join(tried[0])} as the children not shown" if tried[0] else ""
    raise ValueError(f"the kernel's edits{extra} do not give back the bytes shown")


def _edits(profile, map_value, blobs, rest, order) -> bytes:
    """The root FDT after the kernel's edits: rest added first (oldest first), then order's
    children from the oldest (the end of the list) to the newest."""
    buf = new_root_fdt(profile, int.from_bytes(map_value, "little"))
    for name, _, phys in [(n, b"", None) for n in rest] + list(reversed(order)):
        err = add_subtree_in_place(buf, profile, name, phys or 0, len(blobs[name]))
        if err is not None:
            raise ValueError(f"the kernel's edits fail on child {name!r}: {err.message}")
    return bytes(buf[:totalsize(buf)])
