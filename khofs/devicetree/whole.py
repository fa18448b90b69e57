"""A 7.x out/fdt made whole: the kernel sizes the file once, when it makes it, while the FDT
behind it grows; khofs dump completes it as khofs map and khofs record do."""

import struct

from ..kernel.profile import get_profile, profile_for_fdt
from ..kernel.rootfdt import rebuild


def guess_abi(blob: bytes) -> str:
    """The profile a short out/fdt with no kernel at hand comes from, as khofs record
    guesses a copy's (by its compatible, among the releases that size out/fdt once)."""
    return profile_for_fdt(blob, cut_short=True).name


def complete_root_fdt(blob: bytes, subs: dict, abi: str | None, root_phys=None, mem=None,
                      made=None) -> tuple[bytes, str, list]:
    """(the whole root FDT, a note saying how, children whose address was not shown) for a
    7.x out/fdt shown shorter than its header says: read from its page through a daemon,
    or else rebuilt the kernel's way (as khofs map and record do); ValueError if neither."""
    size, shown = struct.unpack_from(">I", blob, 4)[0], len(blob)
    abi = abi or guess_abi(blob)
    why = f"out/fdt shows {shown} of the FDT's {size} bytes (a {abi} kernel sizes it once, " \
        "when it makes the file)"
    if root_phys is not None and mem is not None:
        whole = mem.read(root_phys, size)
        if whole[:shown] == blob:
            return whole, f"{why}; the rest read from the root FDT's page", []
    whole, unseen = rebuild(blob, subs, get_profile(abi), made)
    where = (f", but where {', '.join(unseen)} {'lives' if len(unseen) == 1 else 'live'} "
             "is not shown") if unseen else ""
    return whole, f"{why}; the rest rebuilt the kernel's way{where}", unseen
