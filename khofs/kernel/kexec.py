"""kexec of one emulated machine: load the next kernel's image, then exec it into a Handover.

As kexec_core and kho_fill_kimage split it in the kernel: loading attaches the KHO FDT page and
the scratch array; exec keeps only preserved memory (and what the next kernel must read to
find it) for the next boot.
"""

import errno
from dataclasses import asdict

from .errors import KernelError
from .fdt import check_header, getprop, subnodes, totalsize
from .handover import Handover, KexecImage
from .kho_in import preserved_runs
from .memtrack import KHOSER_BITMAP_SIZE, MapError, chunk_elements, iter_chunks
from .physmem import PAGE_SHIFT, PAGE_SIZE, RangeSet
from .profile import NO_KHO, NO_KHO_RELEASE, get_profile, release_profile_name
from .radix import tree_leaves
from .scratch import encode_scratch

KEXEC_SEGMENT_ALIGN = 64 << 10    # the scratch array segment is 64 KiB aligned


def kexec_load(machine, cmdline: str | None = None, release: str | None = None,
               abi: str | None = None) -> KexecImage:
    """kexec -s -l: kho_fill_kimage attaches the FDT page and a copy of the scratch array.
    `abi`, or else the release, picks the next kernel's profile (default: this one's)."""
    named = abi or release_profile_name(release)
    nxt = get_profile(named) if named else machine.profile
    image = KexecImage(cmdline if cmdline is not None else machine.cmdline,
                       release or (nxt.release if nxt else NO_KHO_RELEASE),
                       abi=nxt.name if nxt else NO_KHO)
    attach = machine.kho_enable and (machine.kho_out.finalized or
                                  not machine.profile.handover_needs_finalize)
    if attach:
        image.fdt_phys = machine.kho_out.fdt_page
        image.scratch_bytes = encode_scratch(machine.scratch)
    machine.image = image
    return image


def kexec_exec(machine) -> Handover:
    """kexec -e: what reaches the next kernel. Only preserved memory survives."""
    image = machine.image
    if image is None:
        raise KernelError(errno.ENOENT, "no kexec image is loaded (kexec load first)")
    config = asdict(machine.config)
    config["abi"] = image.abi
    config["release"] = None
    ho = Handover(cmdline=image.cmdline, release=image.release, previous_release=machine.release,
                  kexec_count=machine.kexec_count + 1, config=config)
    if image.fdt_phys is None:
        if machine.kho_enable:
            ho.notes.append("the image was loaded before KHO was finalized: it carries no "
                            "handover, nothing is preserved")
        return ho
    ho.fdt_phys = image.fdt_phys
    keep = RangeSet([(image.fdt_phys, image.fdt_phys + PAGE_SIZE)])
    fdt = machine.mem.read(image.fdt_phys, PAGE_SIZE)
    runs = []
    valid = check_header(fdt) == 0
    if valid:
        try:
            runs = preserved_runs(machine.mem, image.fdt_phys, machine.profile.preserve_bits,
                                  profile=machine.profile)
        except MapError:
            runs = []
        _keep_map_pages(machine, fdt, keep)
    else:
        ho.notes.append("the handed-over FDT page holds no valid FDT (KHO was never "
                        "finalized): the next kernel rejects the handover")
    preserved = RangeSet((p, p + s) for _, p, s in runs)
    for s, e in preserved:
        keep.add(s, e)
    if valid:
        for name, off in subnodes(fdt, 0):
            prop = getprop(fdt, off, machine.profile.sub_prop)
            if prop is None or len(prop) != 8:
                continue
            phys = int.from_bytes(prop, "little")
            bs = getprop(fdt, off, "blob-size") if machine.profile.blob_size else None
            if bs is not None and len(bs) == 8:
                size = max(int.from_bytes(bs, "little"), 1)
            else:
                size = max(totalsize(machine.mem.read(phys, 8)), 8) if phys + 8 <= machine.mem.size else 8
            if not preserved.contains(phys, phys + size):
                ho.notes.append(
                    f"sub-FDT '{name}' at 0x{phys:x} ({size} bytes) is not in preserved "
                    "memory: the next kernel finds whatever reused that memory "
                    "(khofs shows it zeroed)")
    # The scratch array goes in a kexec segment placed in scratch, 64 KiB aligned, top-down.
    seg = place_segment(machine.scratch, len(image.scratch_bytes))
    if seg is None:
        raise KernelError(errno.EADDRNOTAVAIL, "the scratch array does not fit in any scratch area")
    ho.scratch_phys, ho.scratch_len = seg, len(image.scratch_bytes)
    for pfn in list(machine.mem.pages):
        phys = pfn << PAGE_SHIFT
        if keep.contains(phys, phys + PAGE_SIZE):
            ho.pages[pfn] = machine.mem.pages[pfn]
    first = seg >> PAGE_SHIFT
    last = (seg + max(1, ho.scratch_len) - 1) >> PAGE_SHIFT
    for pfn in range(first, last + 1):
        ho.pages.setdefault(pfn, bytearray(PAGE_SIZE))
    page = bytearray(ho.pages[first])
    off = seg - (first << PAGE_SHIFT)
    page[off:off + ho.scratch_len] = image.scratch_bytes
    ho.pages[first] = page
    return ho


def _keep_map_pages(machine, fdt: bytes, keep: RangeSet) -> None:
    """The chunk list and bitmaps: read by the next kernel before it frees them."""
    prop = getprop(fdt, 0, "preserved-memory-map")
    if prop is None or len(prop) != 8:
        return
    if machine.profile.radix:
        seen = set()
        try:
            tree_leaves(machine.mem, int.from_bytes(prop, "little"), seen)
        except MapError:
            pass
        for p in seen:
            if p + PAGE_SIZE <= machine.mem.size:
                keep.add(p, p + PAGE_SIZE)
        return
    try:
        for phys, (_, _, num), page in iter_chunks(machine.mem, int.from_bytes(prop, "little")):
            keep.add(phys, phys + PAGE_SIZE)
            for _, b in chunk_elements(page, min(num, KHOSER_BITMAP_SIZE)):
                b -= b % PAGE_SIZE
                if b + PAGE_SIZE <= machine.mem.size:
                    keep.add(b, b + PAGE_SIZE)
    except MapError:
        pass            # the next kernel cannot read on from here either


def place_segment(scratch, size: int) -> int | None:
    """Where kexec puts a segment of size bytes: the top of the first scratch area it fits."""
    for addr, ssize in scratch:
        top = addr + ssize - size
        cand = top - top % KEXEC_SEGMENT_ALIGN
        if ssize >= size and cand >= addr:
            return cand
    return None
