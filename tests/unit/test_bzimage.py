"""The bzImage setup-header checks of the kernel and of kexec-tools, and khofs image."""

import glob
import os
import struct

import pytest

from khofs.kernel import bzimage


def test_made_image_passes_both_probes_and_gives_its_release():
    img = bzimage.make_image("6.18.9")
    assert len(img) == 16 << 10
    assert bzimage.kernel_probe(img) is None and bzimage.tools_probe(img) is None
    hdr = bzimage.parse(img)
    assert (hdr.release, hdr.protocol, hdr.cmdline_size, hdr.kern16_size) == \
        ("6.18.9", 0x020F, 2047, 1024)


@pytest.mark.parametrize("edit, why", [
    (lambda b: b.__setitem__(slice(0x202, 0x206), b"HdrX"), "Not a bzImage"),
    (lambda b: struct.pack_into("<H", b, 0x1FE, 0), "No x86 boot sector present"),
    (lambda b: struct.pack_into("<H", b, 0x206, 0x020B), "Must be at least protocol version 2.12"),
    (lambda b: b.__setitem__(0x211, 0), "zImage not a bzImage"),
    (lambda b: struct.pack_into("<H", b, 0x236, 2), "Not a bzImage64. XLF_KERNEL_64 is not set."),
    (lambda b: struct.pack_into("<H", b, 0x236, 1), "XLF_CAN_BE_LOADED_ABOVE_4G is not set."),
])
def test_kernel_probe_in_order(edit, why):
    b = bytearray(bzimage.make_image("6.18.9"))
    edit(b)
    assert bzimage.kernel_probe(bytes(b)) == why
    assert bzimage.tools_probe(bytes(b)) is not None


def test_short_files():
    assert bzimage.kernel_probe(b"\0" * 0x76) == "File is too short to be a bzImage"
    assert bzimage.kernel_probe(b"\0" * 0x77) == "Not a bzImage"
    assert bzimage.tools_probe(bzimage.make_image("6.18.9")[:1023]) == "File is too short to be a bzImage!"


def test_tools_probe_wants_relocatable():
    b = bytearray(bzimage.make_image("6.18.9"))
    b[0x234] = 0
    assert bzimage.kernel_probe(bytes(b)) is None
    assert bzimage.tools_probe(bytes(b)) == "bzImage is not relocatable"


def test_release_must_be_one_word():
    with pytest.raises(ValueError):
        bzimage.make_image("6.18 9")


_real = sorted(glob.glob("/boot/vmlinuz-*"))
REAL = os.environ.get("KHOFS_TEST_VMLINUZ") or (_real[-1] if _real else None)


@pytest.mark.skipif(REAL is None, reason="no /boot/vmlinuz-* and no KHOFS_TEST_VMLINUZ")
def test_real_vmlinuz_gives_its_release():
    with open(REAL, "rb") as f:
        data = f.read()
    assert bzimage.kernel_probe(data) is None
    rel = bzimage.parse(data).release
    assert rel and (os.path.basename(REAL).removeprefix("vmlinuz-") == rel
                    or "KHOFS_TEST_VMLINUZ" in os.environ)
