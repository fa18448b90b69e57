"""What crosses a kexec: the FDT address, the scratch array, and the pages that survive.

A Handover is built by the old kernel's `kexec -e` and consumed by the next boot. It can be
saved to a file (atomically, by the caller) so that a new daemon boots from it.
"""

import json
import struct
from dataclasses import asdict, dataclass, field

MAGIC = b"KHOFS-HANDOVER-1\n"
RANGE = struct.Struct("<QQ")         # phys, length; followed by the bytes


@dataclass
class KexecImage:
    """A loaded image (kexec -s -l): what the next boot will receive."""
    cmdline: str
    release: str
    # Attached at load time by kho_fill_kimage; None when the image carries no handover.
    fdt_phys: int | None = None
    scratch_bytes: bytes | None = None
    abi: str | None = None          # the loaded kernel's ABI profile


@dataclass
class Handover:
    """What reaches the next kernel: preserved pages, the FDT, scratch, its boot."""
    cmdline: str
    release: str
    previous_release: str
    kexec_count: int
    config: dict
    fdt_phys: int | None = None
    scratch_phys: int | None = None
    scratch_len: int = 0
    pages: dict = field(default_factory=dict)      # pfn -> bytes (4 KiB) of surviving pages
    notes: list = field(default_factory=list)      # what khofs reported at kexec
    replay: dict | None = None     # khofs mount --replay: the snapshot and what it lacks

    def dumps(self) -> bytes:
        """The handover as bytes, for the state dir."""
        meta = asdict(self)
        pages = meta.pop("pages")
        head = json.dumps(meta).encode()
        out = [MAGIC, struct.pack("<Q", len(head)), head, struct.pack("<Q", len(pages))]
        for pfn in sorted(pages):
            out.append(RANGE.pack(pfn << 12, len(pages[pfn])))
            out.append(pages[pfn])
        return b"".join(out)

    @classmethod
    def loads(cls, data: bytes) -> "Handover":
        """A handover from dumps() bytes; ValueError if they are not one."""
        if not data.startswith(MAGIC):
            raise ValueError("not a khofs handover file")
        pos = len(MAGIC)
        (hlen,) = struct.unpack_from("<Q", data, pos)
        pos += 8
        meta = json.loads(data[pos:pos + hlen])
        pos += hlen
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8
        pages = {}
        for _ in range(n):
            phys, ln = RANGE.unpack_from(data, pos)
            pos += RANGE.size
            pages[phys >> 12] = bytes(data[pos:pos + ln])
            pos += ln
        if pos != len(data):
            raise ValueError("trailing bytes in handover file")
        return cls(pages=pages, **meta)
