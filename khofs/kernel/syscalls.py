"""kexec_file_load(2), kexec_load(2) and reboot(2) of the emulated kernel.

Each answers in the order the kernel checks (kernel/kexec_file.c, kernel/kexec.c,
kernel/kexec_core.c, kernel/reboot.c, arch/x86/kernel/kexec-bzimage64.c). What a syscall
takes from the caller's memory or fds arrives already read: bytes, or the errno the read
gave, so this stays pure.
"""

import errno
import stat
import struct
from dataclasses import dataclass

from . import bzimage, kexec_mem
from .errors import KernelError
from .handover import KexecImage
from .kexec import kexec_load as attach_handover
from .profile import NO_KHO, NO_KHO_KEXEC_FILE_FLAGS, get_profile, release_profile_name

# uapi/linux/kexec.h
KEXEC_FILE_UNLOAD = 0x1
KEXEC_FILE_ON_CRASH = 0x2
KEXEC_FILE_NO_INITRAMFS = 0x4
KEXEC_FILE_DEBUG = 0x8
KEXEC_FILE_NO_CMA = 0x10
KEXEC_FILE_FORCE_DTB = 0x20
KEXEC_ON_CRASH = 0x1
KEXEC_PRESERVE_CONTEXT = 0x2
KEXEC_UPDATE_ELFCOREHDR = 0x4
KEXEC_CRASH_HOTPLUG_SUPPORT = 0x8
KEXEC_ARCH_MASK = 0xFFFF0000
KEXEC_ARCH_DEFAULT = 0
KEXEC_ARCH_X86_64 = 62 << 16
KEXEC_SEGMENT_MAX = 16
KEXEC_FLAGS = KEXEC_ON_CRASH | KEXEC_PRESERVE_CONTEXT | KEXEC_UPDATE_ELFCOREHDR | \
    KEXEC_CRASH_HOTPLUG_SUPPORT
# memdup_user() is one kmalloc: larger than KMALLOC_MAX_SIZE (4 MiB on x86_64) is ENOMEM.
KMALLOC_MAX_SIZE = 4 << 20
KEXEC_FILE_SIZE_MAX = (1 << 31) - 1          # INT_MAX
SEGMENT = struct.Struct("<QQQQ")             # struct kexec_segment: buf, bufsz, mem, memsz

# reboot(2)
LINUX_REBOOT_MAGIC1 = 0xFEE1DEAD
LINUX_REBOOT_MAGIC2 = (0x28121969, 0x05121996, 0x16041998, 0x20112000)
CMD_RESTART = 0x01234567
CMD_HALT = 0xCDEF0123
CMD_CAD_ON = 0x89ABCDEF
CMD_CAD_OFF = 0x00000000
CMD_POWER_OFF = 0x4321FEDC
CMD_RESTART2 = 0xA1B2C3D4
CMD_SW_SUSPEND = 0xD000FCE2
CMD_KEXEC = 0x45584543


def kexec_file_flags(profile) -> int:
    """KEXEC_FILE_FLAGS of the running kernel (its profile; None: a kernel without KHO)."""
    return profile.kexec_file_flags if profile is not None else NO_KHO_KEXEC_FILE_FLAGS


def read_file_errno(st_mode: int | None, readable: bool, size: int) -> int | None:
    """kernel_read_file_from_fd's refusals of an fd: None, or the errno it returns."""
    if st_mode is None or not readable:
        return errno.EBADF                    # no such fd, or not open for reading
    if not stat.S_ISREG(st_mode):
        return errno.EINVAL
    if size <= 0:
        return errno.EINVAL
    if size > KEXEC_FILE_SIZE_MAX:
        return errno.EFBIG
    return None


@dataclass
class LoadResult:
    """What a successful load did."""
    crash: bool
    unloaded: bool = False
    release: str | None = None
    abi: str | None = None          # the next kernel's profile ("none": without KHO)
    handover: bool = False
    cmdline: str | None = None


def _data(v, what):
    """A read argument: bytes, or the errno its read gave."""
    if isinstance(v, int):
        raise KernelError(v, f"reading {what} failed")
    return v


def has_crashkernel(machine) -> bool:
    """crashkernel= reserved a region for crash kernels (crashk_res)."""
    return any(p.split("=", 1)[0] == "crashkernel" for p in machine.cmdline.split())


def sys_kexec_file_load(machine, *, cap_sys_boot: bool, flags: int, kernel, initrd,
                        cmdline, cmdline_len: int) -> LoadResult:
    """kexec_file_load(2). kernel/initrd: the file's bytes or the errno reading its fd gave
    (read_file_errno); cmdline: the cmdline_len bytes, an errno (EFAULT), or None when
    cmdline_len is 0 or past KMALLOC_MAX_SIZE (not read)."""
    crash = bool(flags & KEXEC_FILE_ON_CRASH)
    if not cap_sys_boot:
        raise KernelError(errno.EPERM, "kexec_load_permitted: no CAP_SYS_BOOT")
    if flags != flags & kexec_file_flags(machine.profile):
        raise KernelError(errno.EINVAL, f"unknown kexec_file_load flags 0x{flags:x}")
    if flags & KEXEC_FILE_UNLOAD:
        if crash:
            machine.crash_image = None
        else:
            machine.image = None
        return LoadResult(crash, unloaded=True)
    if crash:
        machine.crash_image = None          # freed before the new one is built
    kbuf = _data(kernel, "the kernel fd")
    why = bzimage.kernel_probe(kbuf)
    if why is not None:
        raise KernelError(errno.ENOEXEC, f"kexec-bzImage64: {why}")
    ibuf = None
    if not flags & KEXEC_FILE_NO_INITRAMFS:
        ibuf = _data(initrd, "the initrd fd")
    text = ""
    if cmdline_len:
        if cmdline_len > KMALLOC_MAX_SIZE:
            raise KernelError(errno.ENOMEM, "memdup_user: command line larger than kmalloc allows")
        cbuf = _data(cmdline, "the command line")
        if cbuf[cmdline_len - 1] != 0:
            raise KernelError(errno.EINVAL, "the command line does not end in NUL")
        text = cbuf[:cbuf.index(0)].decode("utf-8", "replace")
    hdr = bzimage.parse(kbuf)
    if len(kbuf) < hdr.kern16_size:
        raise KernelError(errno.ENOEXEC, "kexec-bzImage64: bzImage truncated")
    if cmdline_len > hdr.cmdline_size:
        raise KernelError(errno.EINVAL, "kexec-bzImage64: Kernel command line too long")
    if crash and not has_crashkernel(machine):
        raise KernelError(errno.EADDRNOTAVAIL, "no crashkernel= region to load a crash kernel in")
    areas = machine.scratch if machine.kho_enable and not crash else \
        [(0x100000, machine.mem.size - 0x100000)]
    segs = kexec_mem.image_segments(len(kbuf), hdr.kern16_size,
                                    len(ibuf) if ibuf is not None else None, cmdline_len)
    if kexec_mem.place(areas, segs) is None:
        raise KernelError(errno.EADDRNOTAVAIL, "the image's segments do not fit in "
                          + ("the KHO scratch areas" if areas is machine.scratch else "memory"))
    release = hdr.release
    if crash:
        named = release_profile_name(release)
        nxt = get_profile(named) if named else machine.profile
        abi = nxt.name if nxt else NO_KHO
        machine.crash_image = KexecImage(text, release or machine.release, abi=abi)
        return LoadResult(True, release=release, abi=abi, cmdline=text)
    # The image's release picks the next kernel's profile; without one, the running one.
    img = attach_handover(machine, text, release)
    return LoadResult(False, release=img.release, abi=img.abi,
                      handover=img.fdt_phys is not None, cmdline=text)


def sys_kexec_load(machine, *, cap_sys_boot: bool, entry: int, nr_segments: int, flags: int,
                   segments) -> LoadResult:
    """kexec_load(2): the user-space loader's segments. segments: the nr_segments struct
    kexec_segment bytes, or EFAULT; each with its buffer's bytes appended in `bufs`."""
    crash = bool(flags & KEXEC_ON_CRASH)
    if not cap_sys_boot:
        raise KernelError(errno.EPERM, "kexec_load_permitted: no CAP_SYS_BOOT")
    if (flags & KEXEC_FLAGS) != (flags & ~KEXEC_ARCH_MASK):
        raise KernelError(errno.EINVAL, f"unknown kexec_load flags 0x{flags:x}")
    if nr_segments > KEXEC_SEGMENT_MAX:
        raise KernelError(errno.EINVAL, f"more than {KEXEC_SEGMENT_MAX} segments")
    if flags & KEXEC_ARCH_MASK not in (KEXEC_ARCH_X86_64, KEXEC_ARCH_DEFAULT):
        raise KernelError(errno.EINVAL, "not an x86_64 kexec image")
    if nr_segments == 0:
        if crash:
            machine.crash_image = None
        else:
            machine.image = None
        return LoadResult(crash, unloaded=True)
    segs, bufs = segments if not isinstance(segments, int) else (_data(segments, "segments"), None)
    table = [SEGMENT.unpack_from(segs, i * SEGMENT.size) for i in range(nr_segments)]
    if crash:
        machine.crash_image = None
        if not has_crashkernel(machine):
            raise KernelError(errno.EADDRNOTAVAIL, "no crashkernel= region to load a crash kernel in")
    sanity_check_segment_list(table, machine.mem.size)
    if isinstance(bufs, int):
        raise KernelError(bufs, "copying a segment's buffer failed")
    release, text = boot_params_of(table, bufs or [])
    # No KHO handover: kho_fill_kimage runs only for kexec_file_load.
    named = release_profile_name(release)
    nxt = get_profile(named) if named else machine.profile
    img = KexecImage(text if text is not None else "", release or machine.release,
                     abi=nxt.name if nxt else NO_KHO)
    if crash:
        machine.crash_image = img
    else:
        machine.image = img
    return LoadResult(crash, release=img.release, abi=img.abi, cmdline=img.cmdline)


def sanity_check_segment_list(table, mem_size: int) -> None:
    """kexec_core's sanity_check_segment_list: alignment, overlap, sizes, half of memory."""
    page_mask = 0xFFF
    for _, _, mem, memsz in table:
        end = mem + memsz
        if end >= 1 << 64 or (mem & page_mask) or (end & page_mask):
            raise KernelError(errno.EADDRNOTAVAIL, "a segment is not page aligned")
        if end >= 1 << 46:                   # x86_64 KEXEC_DESTINATION_MEMORY_LIMIT (MAXMEM)
            raise KernelError(errno.EADDRNOTAVAIL, "a segment ends past the destination limit")
    for i, (_, _, mi, szi) in enumerate(table):
        for _, _, mj, szj in table[:i]:
            if mi + szi > mj and mi < mj + szj:
                raise KernelError(errno.EINVAL, "segments overlap")
    for _, bufsz, _, memsz in table:
        if bufsz > memsz:
            raise KernelError(errno.EINVAL, "a segment's buffer is larger than its memory")
    half = (mem_size >> 12) // 2
    total = 0
    for _, _, _, memsz in table:
        pages = (memsz + 0xFFF) >> 12
        if pages > half:
            raise KernelError(errno.EINVAL, "a segment takes more than half of memory")
        total += pages
    if total > half:
        raise KernelError(errno.EINVAL, "the segments take more than half of memory")


def boot_params_of(table, bufs) -> tuple[str | None, str | None]:
    """The release and command line a user-space loaded x86 kernel boots with.

    A setup header ("HdrS") in a segment gives the release, and its cmd_line_ptr (with
    ext_cmd_line_ptr) the command line. kexec-tools 2.0.25 leaves both out of its
    boot_params segment and puts the command line right after its 4 KiB (seen on a run;
    docs/run.md): that layout is the fallback."""
    release = cmdline = None
    for buf in bufs:
        if len(buf) < 0x280 or buf[0x202:0x206] != b"HdrS":
            continue
        release = release or bzimage.parse(buf).release
        ptr = struct.unpack_from("<I", buf, 0x228)[0] | struct.unpack_from("<I", buf, 0xC8)[0] << 32
        for (_, _, mem, _), b in zip(table, bufs):
            if ptr and mem <= ptr < mem + len(b):
                cmdline = _cstr(b[ptr - mem:])
    if cmdline is None:
        for buf in bufs:
            tail = buf[0x1000:]
            if len(buf) > 0x1000 and b"\0" in tail and tail[:tail.index(b"\0")].isascii() \
                    and tail[:tail.index(b"\0")].decode().isprintable():
                cmdline = _cstr(tail)
                break
    return release, cmdline


def _cstr(b: bytes) -> str:
    return b[:b.find(b"\0") if b"\0" in b else len(b)].decode("utf-8", "replace")


def sys_reboot(machine, *, cap_sys_boot: bool, magic1: int, magic2: int, cmd: int,
               arg=None) -> str:
    """reboot(2): what happens ("kexec", "restart", "halt", "power_off", "cad_on",
    "cad_off"); KernelError for what the kernel refuses. arg: RESTART2's string or EFAULT."""
    if not cap_sys_boot:
        raise KernelError(errno.EPERM, "reboot: no CAP_SYS_BOOT")
    if magic1 != LINUX_REBOOT_MAGIC1 or magic2 not in LINUX_REBOOT_MAGIC2:
        raise KernelError(errno.EINVAL, "reboot: bad magic numbers")
    if cmd == CMD_RESTART:
        return "restart"
    if cmd == CMD_CAD_ON:
        return "cad_on"
    if cmd == CMD_CAD_OFF:
        return "cad_off"
    if cmd == CMD_HALT:
        return "halt"
    if cmd == CMD_POWER_OFF:
        return "power_off"
    if cmd == CMD_RESTART2:
        _data(arg, "the restart command")
        return "restart"
    if cmd == CMD_KEXEC:
        if machine.image is None:
            raise KernelError(errno.EINVAL, "kernel_kexec: no kexec image is loaded")
        return "kexec"
    if cmd == CMD_SW_SUSPEND:
        raise KernelError(errno.ENOSYS, "the emulated machine has no hibernation")
    raise KernelError(errno.EINVAL, f"reboot: unknown command 0x{cmd:x}")
