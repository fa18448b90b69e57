"""kexec_file_load, kexec_load and reboot of the emulated kernel: each refusal in the
kernel's order of checks."""

import errno
import struct

import pytest

from khofs.kernel import syscalls as sc
from khofs.kernel.bzimage import make_image
from khofs.kernel.errors import KernelError
from khofs.kernel.machine import Machine, MachineConfig

IMG = make_image("6.18.9")
CL = b"kho=on\0"


def load(m, **kw):
    args = dict(cap_sys_boot=True, flags=sc.KEXEC_FILE_NO_INITRAMFS, kernel=IMG, initrd=None,
                cmdline=CL, cmdline_len=len(CL))
    args.update(kw)
    return sc.sys_kexec_file_load(m, **args)


def errno_of(fn, *a, **kw):
    with pytest.raises(KernelError) as e:
        fn(*a, **kw)
    return e.value.errno


def test_order_of_checks():
    m = Machine("kho=on")
    # permission before flags, flags before the fd, the fd before the probe
    assert errno_of(load, m, cap_sys_boot=False, flags=0x400) == errno.EPERM
    assert errno_of(load, m, flags=0x400, kernel=errno.EBADF) == errno.EINVAL
    assert errno_of(load, m, kernel=errno.EBADF, cmdline=errno.EFAULT) == errno.EBADF
    assert errno_of(load, m, kernel=b"x" * 4096, cmdline=errno.EFAULT) == errno.ENOEXEC
    # the initrd is read before the command line, unless NO_INITRAMFS
    assert errno_of(load, m, flags=0, initrd=errno.EBADF, cmdline=errno.EFAULT) == errno.EBADF
    assert errno_of(load, m, cmdline=errno.EFAULT) == errno.EFAULT
    assert errno_of(load, m, cmdline=b"kho=on", cmdline_len=6) == errno.EINVAL
    assert errno_of(load, m, cmdline=None, cmdline_len=sc.KMALLOC_MAX_SIZE + 1) == errno.ENOMEM
    long = b"a" * 2047 + b"\0"
    assert errno_of(load, m, cmdline=long, cmdline_len=len(long)) == errno.EINVAL
    assert errno_of(load, m, kernel=IMG[:1000]) == errno.ENOEXEC     # bzImage truncated
    assert m.image is None


def test_flags_per_release():
    from khofs.kernel.profile import PROFILES
    want = {"6.16": 0xF, "6.18": 0x1F, "7.0": 0x3F, "7.1": 0x3F, "7.2": 0x3F, "7.4": 0x3F}
    assert {n: sc.kexec_file_flags(p) for n, p in PROFILES.items()} == want
    assert sc.kexec_file_flags(None) == 0xF            # a kernel before KHO
    m = Machine("kho=on", MachineConfig(abi="6.16"))
    assert errno_of(load, m, flags=sc.KEXEC_FILE_NO_INITRAMFS | sc.KEXEC_FILE_NO_CMA) == errno.EINVAL


def test_load_unload_and_crash_slot():
    m = Machine("kho=on crashkernel=256M")
    r = load(m)
    assert (r.release, r.abi, r.handover, r.cmdline) == ("6.18.9", "6.18", False, "kho=on")
    r = load(m, flags=sc.KEXEC_FILE_ON_CRASH | sc.KEXEC_FILE_NO_INITRAMFS)
    assert m.crash_image is not None and m.image is not None
    load(m, flags=sc.KEXEC_FILE_UNLOAD, kernel=errno.EBADF)
    assert m.image is None and m.crash_image is not None
    load(m, flags=sc.KEXEC_FILE_UNLOAD | sc.KEXEC_FILE_ON_CRASH, kernel=errno.EBADF)
    assert m.crash_image is None
    st = m.status()
    assert (st["kexec_loaded"], st["kexec_crash_loaded"]) == (False, False)


def test_crash_load_needs_crashkernel():
    m = Machine("kho=on")
    assert errno_of(load, m, flags=sc.KEXEC_FILE_ON_CRASH | sc.KEXEC_FILE_NO_INITRAMFS) == \
        errno.EADDRNOTAVAIL


def test_the_image_release_picks_the_next_kernel():
    m = Machine("kho=on")
    assert (load(m, kernel=make_image("7.2.1")).abi, m.image.release) == ("7.2", "7.2.1")
    assert load(m, kernel=make_image("6.12.5")).abi == "none"
    r = load(m, kernel=make_image("6.18.9")[:0x20E] + b"\0\0" + make_image("6.18.9")[0x210:])
    assert (r.abi, r.release) == ("6.18", m.release)       # no version string: this kernel's


def test_segments_must_fit_in_scratch():
    m = Machine("kho=on kho_scratch=1M,1M,1M")
    big = IMG + b"\0" * (8 << 20)
    assert errno_of(load, m, kernel=big) == errno.EADDRNOTAVAIL
    assert m.image is None


def test_handover_attached_when_finalized_on_6_18():
    m = Machine("kho=on")
    m.kho_out.set_finalize(1)
    assert load(m).handover is True


def test_read_file_errno():
    assert sc.read_file_errno(None, False, 0) == errno.EBADF
    assert sc.read_file_errno(0o100644, False, 10) == errno.EBADF
    assert sc.read_file_errno(0o010644, True, 10) == errno.EINVAL      # a FIFO
    assert sc.read_file_errno(0o100644, True, 0) == errno.EINVAL
    assert sc.read_file_errno(0o100644, True, 10) is None


def seg(mem, memsz, bufsz=0):
    return struct.pack("<QQQQ", 0, bufsz, mem, memsz)


def kload(m, nr, segs=b"", flags=0, cap=True, bufs=()):
    return sc.sys_kexec_load(m, cap_sys_boot=cap, entry=0, nr_segments=nr, flags=flags,
                             segments=(segs, list(bufs)))


def test_kexec_load_checks():
    m = Machine("kho=on")
    assert errno_of(kload, m, 17, cap=False) == errno.EPERM
    assert errno_of(kload, m, 1, flags=0x100) == errno.EINVAL
    assert errno_of(kload, m, 17) == errno.EINVAL
    assert errno_of(kload, m, 1, flags=3 << 16) == errno.EINVAL                # another arch
    assert errno_of(kload, m, 1, seg(0x1001, 0x1000)) == errno.EADDRNOTAVAIL
    assert errno_of(kload, m, 2, seg(0x1000, 0x2000) + seg(0x2000, 0x1000)) == errno.EINVAL
    assert errno_of(kload, m, 1, seg(0x1000, 0x1000, 0x2000)) == errno.EINVAL
    assert errno_of(kload, m, 1, seg(0x1000, m.mem.size // 2 + 0x1000)) == errno.EINVAL
    bp = bytearray(0x1000) + b"kho=on z\0"
    r = kload(m, 1, seg(0x1000, 0x2000, len(bp)), flags=sc.KEXEC_ARCH_X86_64, bufs=[bytes(bp)])
    assert (r.cmdline, r.handover, m.image.fdt_phys) == ("kho=on z", False, None)
    kload(m, 0)
    assert m.image is None


def test_reboot():
    m = Machine("kho=on")
    rb = dict(magic1=sc.LINUX_REBOOT_MAGIC1, magic2=sc.LINUX_REBOOT_MAGIC2[0])
    assert errno_of(sc.sys_reboot, m, cap_sys_boot=False, magic1=0, magic2=0, cmd=0) == errno.EPERM
    assert errno_of(sc.sys_reboot, m, cap_sys_boot=True, magic1=0, magic2=0, cmd=0) == errno.EINVAL
    assert errno_of(sc.sys_reboot, m, cap_sys_boot=True, cmd=sc.CMD_KEXEC, **rb) == errno.EINVAL
    assert errno_of(sc.sys_reboot, m, cap_sys_boot=True, cmd=0x1234, **rb) == errno.EINVAL
    for cmd, what in ((sc.CMD_RESTART, "restart"), (sc.CMD_HALT, "halt"),
                      (sc.CMD_POWER_OFF, "power_off"), (sc.CMD_CAD_ON, "cad_on"),
                      (sc.CMD_CAD_OFF, "cad_off")):
        assert sc.sys_reboot(m, cap_sys_boot=True, cmd=cmd, **rb) == what
    assert errno_of(sc.sys_reboot, m, cap_sys_boot=True, cmd=sc.CMD_RESTART2, arg=errno.EFAULT,
                    **rb) == errno.EFAULT
    load(m)
    assert sc.sys_reboot(m, cap_sys_boot=True, cmd=sc.CMD_KEXEC, **rb) == "kexec"
