"""The x86 boot protocol's setup header of a bzImage: what kexec checks before it loads one.

Offsets and checks follow Documentation/arch/x86/boot.rst, the kernel's bzImage64 probe and
load (arch/x86/kernel/kexec-bzimage64.c) and kexec-tools' bzImage64 probe.
"""

import re
import struct
from dataclasses import dataclass

SETUP_SECTS = 0x1F1
BOOT_FLAG = 0x1FE          # u16 0xAA55
HEADER = 0x202             # "HdrS"
VERSION = 0x206            # u16 boot protocol
KERNEL_VERSION = 0x20E     # u16: offset of the version string, minus 0x200
LOADFLAGS = 0x211
RELOCATABLE = 0x234
XLOADFLAGS = 0x236
CMDLINE_SIZE = 0x238       # u32, protocol 2.06+
SETUP_HEADER_SIZE = 0x77   # sizeof(struct setup_header), protocol 2.15

LOADED_HIGH = 0x01
XLF_KERNEL_64 = 0x01
XLF_CAN_BE_LOADED_ABOVE_4G = 0x02
MIN_PROTOCOL = 0x020C


@dataclass
class BzImage:
    """What kexec reads of a bzImage's setup header."""
    setup_sects: int
    protocol: int
    cmdline_size: int
    kernel_version: str | None     # the whole string, e.g. "6.18.7 (u@h) #1 SMP ..."

    @property
    def release(self) -> str | None:
        """uname -r of the image: the version string's first word."""
        if not self.kernel_version:
            return None
        return self.kernel_version.split()[0] or None

    @property
    def kern16_size(self) -> int:
        """The real-mode part: setup sectors (0 means 4) plus the boot sector."""
        return ((self.setup_sects or 4) + 1) * 512


def _u8(buf, off):
    return buf[off]


def _u16(buf, off):
    return struct.unpack_from("<H", buf, off)[0]


def _u32(buf, off):
    return struct.unpack_from("<I", buf, off)[0]


def kernel_probe(buf: bytes) -> str | None:
    """The kernel's bzImage64_probe: None if it takes the image, else why not (ENOEXEC)."""
    # The kernel compares the length with the header's size, not with where it ends.
    if len(buf) < SETUP_HEADER_SIZE:
        return "File is too short to be a bzImage"
    buf = bytes(buf[:0x280]).ljust(0x280, b"\0")
    if buf[HEADER:HEADER + 4] != b"HdrS":
        return "Not a bzImage"
    if _u16(buf, BOOT_FLAG) != 0xAA55:
        return "No x86 boot sector present"
    if _u16(buf, VERSION) < MIN_PROTOCOL:
        return "Must be at least protocol version 2.12"
    if not _u8(buf, LOADFLAGS) & LOADED_HIGH:
        return "zImage not a bzImage"
    if not _u16(buf, XLOADFLAGS) & XLF_KERNEL_64:
        return "Not a bzImage64. XLF_KERNEL_64 is not set."
    if not _u16(buf, XLOADFLAGS) & XLF_CAN_BE_LOADED_ABOVE_4G:
        return "XLF_CAN_BE_LOADED_ABOVE_4G is not set."
    return None


def tools_probe(buf: bytes) -> str | None:
    """kexec-tools' bzImage64_probe (it runs before the syscall): None if it takes the file."""
    if len(buf) < 2 * 512:
        return "File is too short to be a bzImage!"
    if buf[HEADER:HEADER + 4] != b"HdrS":
        return "Not a bzImage"
    if buf[BOOT_FLAG:BOOT_FLAG + 2] != b"\x55\xaa":
        return "No x86 boot sector present"
    if _u16(buf, VERSION) < MIN_PROTOCOL:
        return "Must be at least protocol version 2.12"
    if not _u8(buf, LOADFLAGS) & LOADED_HIGH:
        return "zImage not a bzImage"
    if not _u8(buf, RELOCATABLE) & 1:
        return "bzImage is not relocatable"
    if _u16(buf, XLOADFLAGS) & 3 != 3:
        return "Cannot be loaded above 4G"
    return None


def parse(buf: bytes) -> BzImage:
    """The header fields of an image kernel_probe took."""
    ver_off = _u16(buf, KERNEL_VERSION)
    version = None
    if ver_off:
        start = ver_off + 0x200
        end = buf.find(b"\0", start, start + 256)
        if start < len(buf) and end > start:
            version = buf[start:end].decode("ascii", "replace")
    return BzImage(_u8(buf, SETUP_SECTS), _u16(buf, VERSION), _u32(buf, CMDLINE_SIZE), version)


def make_image(release: str, cmdline_size: int = 2047, size: int = 16 << 10) -> bytes:
    """A file both probes take and the kernel's bzImage64 load accepts, whose version string
    gives release; it holds no kernel and boots nothing."""
    if not re.fullmatch(r"[\x21-\x7e]{1,64}", release):
        raise ValueError("a release is 1 to 64 printable characters without spaces")
    setup_sects = 1
    buf = bytearray(max(size, (setup_sects + 1) * 512 + 512))
    version = f"{release} (khofs image) #1 SMP\0".encode()
    ver_at = 0x300                                  # inside the setup sector, past the header
    buf[SETUP_SECTS] = setup_sects
    struct.pack_into("<H", buf, BOOT_FLAG, 0xAA55)
    buf[HEADER:HEADER + 4] = b"HdrS"
    struct.pack_into("<H", buf, VERSION, 0x020F)
    struct.pack_into("<H", buf, KERNEL_VERSION, ver_at - 0x200)
    buf[LOADFLAGS] = LOADED_HIGH
    buf[RELOCATABLE] = 1
    struct.pack_into("<H", buf, XLOADFLAGS, XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G)
    struct.pack_into("<I", buf, CMDLINE_SIZE, cmdline_size)
    buf[ver_at:ver_at + len(version)] = version
    return bytes(buf)
