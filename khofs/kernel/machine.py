"""One boot of the emulated machine: command line, memory, KHO state; kexec to the next."""

import errno
from dataclasses import dataclass

from . import kexec
from .cmdline import parameq, split_cmdline
from .errors import KernelError
from .fdt import FDT_HEADER, getprop, node_check_compatible, subnodes
from .handover import Handover, KexecImage
from .kho import KhoOut
from .kho_in import (kexec_metadata_in, kho_populate, preserved_runs, retrieve_subtree_phys,
                     sub_fdt_entries)
from .kstrtox import kstrtobool
from .memtrack import MapError
from .physmem import PAGE_SIZE, SZ_1M, Kmalloc, Memblock, PageAllocator, PhysMem, RangeSet
from .producers.memblock import (MEMBLOCK_KHO_FDT, MEMBLOCK_KHO_NODE_COMPATIBLE,
                                 RESERVE_MEM_KHO_NODE_COMPATIBLE, MemblockProducer, ReserveMem,
                                 parse_reserve_mem)
from .producers.test_kho import KHO_TEST_FDT, PREFIX as TEST_PREFIX, TestKho
from .producers.test_kho import restore as test_kho_restore
from .profile import NO_KHO_RELEASE, get_profile, kernel_name
from .scratch import ScratchConfig, format_lines, parse_kho_scratch, reserve_scratch

KERNEL_LOAD_ADDR = 16 * SZ_1M     # x86 LOAD_PHYSICAL_ADDR: where boot reservations start


@dataclass
class MachineConfig:
    """The emulated hardware and KHO profile of a boot."""
    memory: int = 4 << 30
    nodes: int = 1
    boot_reserved: int = 64 << 20
    abi: str | None = None         # None: the profile the release names, else the default
    release: str | None = None     # uname -r; None: the profile's default


@dataclass
class LogLine:
    """One kernel log line with its level."""
    level: str        # "err", "warn", "notice", "info"
    text: str


class Machine:
    """One boot of the emulated machine."""
    def __init__(self, cmdline: str = "kho=on", config: MachineConfig | None = None,
                 handover: Handover | None = None, release: str | None = None):
        self.config = config = config or MachineConfig()
        self.cmdline = cmdline
        release = release or config.release
        # None: a kernel from before KHO; it has no kho/ and knows no kho parameter.
        self.profile = get_profile(kernel_name(config.abi, release))
        self.release = release or (self.profile.release if self.profile else NO_KHO_RELEASE)
        self.kexec_count = handover.kexec_count if handover else 0
        self.previous_release = handover.previous_release if handover else None
        self.dmesg: list[LogLine] = []
        # What of the command line had no effect, and why (the kernel is often silent on it).
        self.ignored: list[str] = []
        # What khofs saw at the kexec that brought up this boot (e.g. unpreserved sub-FDTs).
        self.kexec_notes: list[str] = list(handover.notes) if handover else []
        # khofs mount --replay: the snapshot this boot's handover came from, what it lacked.
        self.replay = handover.replay if handover else None
        self.image: KexecImage | None = None
        self.crash_image: KexecImage | None = None     # kexec -p: never booted by a kexec reboot
        self.mem = PhysMem(config.memory, config.nodes)
        self.memblock = Memblock(self.mem)
        self.memblock.reserve(0, SZ_1M)                  # firmware's low 1 MiB

        self.kho_in = None
        if handover is not None and handover.fdt_phys is not None and self.profile is not None:
            for pfn, data in handover.pages.items():
                # An in-process kexec hands the old kernel's page buffers over without a copy.
                self.mem.pages[pfn] = data if isinstance(data, bytearray) else bytearray(data)
            self.kho_in = kho_populate(self.mem, handover.fdt_phys, handover.scratch_phys,
                                       handover.scratch_len, self.info_or_warn, self.profile)
            if self.kho_in is None:
                self.mem.pages.clear()
            else:
                self.memblock.reserve(handover.scratch_phys, handover.scratch_len)
                self.memblock.scratch_only = RangeSet((a, a + s) for a, s in self.kho_in.scratch)
        if self.kho_in is None:
            if KERNEL_LOAD_ADDR + config.boot_reserved > self.mem.nodes[0][1]:
                raise ValueError("--boot-reserved does not fit in node 0")
            # The kernel image and its early allocations. After a KHO kexec they live in scratch.
            self.memblock.reserve(KERNEL_LOAD_ADDR, config.boot_reserved, kern=True)

        self.kho_enable = False
        self.test_kho = False
        self.scratch_cfg = ScratchConfig()
        self.reserve_mem: list[ReserveMem] = []
        params = split_cmdline(cmdline)
        self._early_params(params)
        self._setup_params(params)

        self.scratch: list[tuple[int, int]] = []
        self._scratch_text = None
        self.preserved = RangeSet()         # what this boot found preserved (kho_mem_deserialize)
        self.incoming_runs: list = []
        if self.kho_in is not None:
            self._kho_memory_init_incoming()
        elif self.kho_enable:
            res = reserve_scratch(self.memblock, self.scratch_cfg)
            if res is None:
                self.kho_enable = False
                if self.profile.scratch_fail_warns:
                    self.warn("KHO: Failed to reserve scratch area, disabling kexec handover")
                self.ignored.append("kho=on: KHO disabled, the scratch areas do not fit in "
                                    "free simulated memory")
            else:
                _, self.scratch = res
        self.pages = PageAllocator(self.mem, self.memblock, [(a, a + s) for a, s in self.scratch])
        self.kmalloc = Kmalloc(self.pages)
        self.kho_out = None
        if self.kho_enable and self.kho_in is not None and self.profile.kexec_metadata:
            kexec_metadata_in(self.kho_in, self.mem, self.info_or_warn)
        if self.kho_enable:
            try:
                self.kho_out = KhoOut(self.mem, self.pages, self.kmalloc, self.profile, self.log_line,
                                      cold_boot=self.kho_in is None, release=self.release,
                                      in_kexec_count=self.kho_in.kexec_count if self.kho_in else 0)
            except KernelError as e:
                if e.errno != errno.ENOMEM:
                    raise
                # kho_init's alloc_page() for the root FDT failed (an incoming map that
                # preserves all free memory): KHO is disabled, no kho/ in debugfs. The
                # kernel says nothing; the line says why the tree is missing.
                self.kho_enable = False
                self.warn("khofs: kho_init: no free page for the root FDT (-ENOMEM), KHO disabled")
        if self.kho_enable and self.kho_in is not None:
            # kho_in_debugfs_init(), at the end of a kho_init() that got this far.
            self.kho_in.blobs = sub_fdt_entries(self.mem, self.kho_in.fdt_phys, self.warn,
                                                self.profile)
        if self.kho_enable:
            if self.test_kho:
                self._test_kho_init()
            if self.reserve_mem:
                # 6.19+: at late_initcall
                self.kho_out.add_producer(MemblockProducer(self.kho_out, self.reserve_mem))

    # -- logging ------------------------------------------------------------
    def info(self, text: str) -> None:
        """Log a line at info level."""
        self.dmesg.append(LogLine("info", text))

    def warn(self, text: str) -> None:
        """Log a line at warning level."""
        self.dmesg.append(LogLine("warn", text))

    def info_or_warn(self, text: str) -> None:
        """Log a KHO line at the level the kernel prints it."""
        info = "found kexec handover" in text or text.startswith("KHO: exec from:")
        (self.info if info else self.warn)(text)

    def log_line(self, text: str) -> None:
        """Log a line, as a warning if it reports a failure."""
        (self.warn if "Failed" in text else self.info)(text)

    def warnings(self):
        """The warning and error lines of this boot's log."""
        return [line for line in self.dmesg if line.level in ("warn", "err")]

    # -- parameters -----------------------------------------------------------
    def _early_params(self, params) -> None:
        prof = self.profile
        for param, val in params:
            try:
                if prof is None and (parameq(param, "kho") or parameq(param, "khofs.test_kho")):
                    # unknown to a kernel without KHO: it goes to init and does nothing
                    self.ignored.append(f"{_shown(param, val)}: ignored, this kernel has no "
                                        "KHO (it came in v6.16)")
                elif parameq(param, "kho"):
                    self.kho_enable = kstrtobool(val)
                elif parameq(param, "khofs.test_kho"):
                    self.test_kho = kstrtobool(val)
                elif prof is not None and parameq(param, prof.scratch_param):
                    msg = parse_kho_scratch(val, self.scratch_cfg, prof.strict_scratch)
                    self.info("KHO: " + msg)
                    if self.kho_in is not None:
                        self.ignored.append(f"{param}={val}: ignored after a KHO kexec, the "
                                            "scratch areas of the previous kernel are reused")
                elif parameq(param, "kho_scratch") or parameq(param, "kho_bootmem"):
                    # a name another release gives the scratch areas: unknown to this one
                    self.ignored.append(f"{_shown(param, val)}: ignored, not a parameter of "
                                        f"this kernel" + (f" (it takes {prof.scratch_param}=)"
                                                          if prof else ""))
            except KernelError as e:
                self.warn(f"Malformed early option '{param}'")
                self.ignored.append(f"{_shown(param, val)}: ignored, {e.message}")

    def _setup_params(self, params) -> None:
        """__setup() parameters, parsed after the early ones; their errors are silent."""
        for param, val in params:
            if parameq(param, "reserve_mem"):
                try:
                    parse_reserve_mem(val, self.reserve_mem, self.memblock, self._reserve_mem_revive)
                except KernelError as e:
                    self.ignored.append(f"{_shown(param, val)}: ignored, {e.message}")

    def _reserve_mem_revive(self, name: str, size: int, align: int):
        """reserve_mem_kho_revive: pick a region up from the incoming memblock subtree."""
        if self.kho_in is None:
            return None
        try:
            phys = retrieve_subtree_phys(self.kho_in, self.mem, MEMBLOCK_KHO_FDT, self.warn)
        except KernelError as e:
            if e.errno != errno.ENOENT:
                self.warn(f"failed to retrieve FDT '{MEMBLOCK_KHO_FDT}' from KHO: {-e.errno}")
            return None
        if phys + FDT_HEADER.size > self.mem.size:
            self.warn(f"khofs: FDT '{MEMBLOCK_KHO_FDT}' at 0x{phys:x} is outside memory; "
                      "a real kernel would fault reading it")
            return None
        fdt = self.mem.read(phys, min(PAGE_SIZE, self.mem.size - phys))
        err = node_check_compatible(fdt, 0, MEMBLOCK_KHO_NODE_COMPATIBLE)
        if err:
            self.warn(f"FDT '{MEMBLOCK_KHO_FDT}' is incompatible with "
                      f"'{MEMBLOCK_KHO_NODE_COMPATIBLE}': {err}")
            return None
        offset = dict(subnodes(fdt, 0)).get(name)
        if offset is None:
            self.warn(f"FDT '{MEMBLOCK_KHO_FDT}' has no child '{name}': -1")
            return None
        err = node_check_compatible(fdt, offset, RESERVE_MEM_KHO_NODE_COMPATIBLE)
        if err:
            self.warn(f"Node '{name}' is incompatible with '{RESERVE_MEM_KHO_NODE_COMPATIBLE}': {err}")
            return None
        p_start, p_size = getprop(fdt, offset, "start"), getprop(fdt, offset, "size")
        if p_start is None or len(p_start) != 8 or p_size is None or len(p_size) != 8:
            return None
        start, psize = int.from_bytes(p_start, "little"), int.from_bytes(p_size, "little")
        if start & (align - 1):
            self.warn(f"KHO reserve-mem '{name}' has wrong alignment (0x{align:x}, 0x{start:x})")
            return None
        if psize != size:
            self.warn(f"KHO reserve-mem '{name}' has wrong size (0x{psize:x} != 0x{size:x})")
            return None
        self.info(f"Revived memory reservation '{name}' from KHO")
        return ReserveMem(name, start, size, align)

    def _test_kho_init(self, seed=None) -> None:
        """The test module's init: restore an incoming kho_test, or preserve fresh folios."""
        try:
            phys = retrieve_subtree_phys(self.kho_in, self.mem, KHO_TEST_FDT, self.warn)
        except KernelError as e:
            if e.errno != errno.ENOENT:
                self.warn(f"{TEST_PREFIX}failed to retrieve {KHO_TEST_FDT} FDT: {-e.errno}")
                return
            self.kho_out.add_producer(TestKho(self.kho_out, seed), first=True)
            return
        if test_kho_restore(self.mem, phys, self.incoming_runs):
            self.info(f"{TEST_PREFIX}KHO restore succeeded")
        else:
            self.warn(f"{TEST_PREFIX}KHO restore failed")

    def start_test_kho(self, seed=None) -> None:
        """Load the test module at run time (as `modprobe test_kho` would)."""
        if not self.kho_enable:
            raise KernelError(errno.ENODEV, "KHO is not enabled")
        if any(isinstance(p, TestKho) for p in self.kho_out.producers) or \
                (self.profile.fdt_at_boot and
                 any(b.name == KHO_TEST_FDT for b in self.kho_out.blobs("sub_fdts"))):
            raise KernelError(errno.EEXIST, "test_kho is already loaded")
        self._test_kho_init(seed)

    def _kho_memory_init_incoming(self) -> None:
        """kho_memory_init after a KHO kexec: reuse scratch, reserve every preserved block."""
        self.scratch = list(self.kho_in.scratch)
        try:
            runs = preserved_runs(self.mem, self.kho_in.fdt_phys, self.profile.preserve_bits,
                                  self.warn, self.profile)
        except MapError as e:
            # kho_mem_retrieve failing clears kho_in.fdt_phys: the boot goes on as a cold one
            # (on scratch it already uses). A real kernel would fault on such a pointer.
            self.warn(f"khofs: the preserved-memory tree is broken ({e}); a real kernel would "
                      "fault walking it: KHO revival is treated as failed")
            self.kho_in = None
            self.memblock.scratch_only = None
            return
        fdt_ok = False
        self.incoming_runs = runs
        outside = [(p, s) for _, p, s in runs if p + s > self.mem.size]
        if outside:
            p, s = outside[0]
            self.warn(f"khofs: the incoming memory map preserves {len(outside)} range(s) outside "
                      f"memory (first [0x{p:x}, 0x{p + s:x})); a real kernel would write to "
                      "struct pages that do not exist")
        for order, phys, size in runs:
            self.memblock.reserve(phys, size)
            self.preserved.add(phys, phys + size)
            if order == 0 and phys <= self.kho_in.fdt_phys < phys + size:
                fdt_ok = True
        if not fdt_ok:
            self.warn("KHO: failed to restore folio for KHO fdt")
        self.memblock.scratch_only = None

    # -- what debugfs shows ------------------------------------------------------
    def scratch_phys_text(self) -> bytes:
        """out/scratch_phys's text."""
        return self._scratch_texts()[0]

    def scratch_len_text(self) -> bytes:
        """out/scratch_len's text."""
        return self._scratch_texts()[1]

    def _scratch_texts(self) -> tuple[bytes, bytes]:
        # The scratch areas are fixed once booted: format them once, not on every read.
        if self._scratch_text is None:
            self._scratch_text = (format_lines(a for a, _ in self.scratch),
                                  format_lines(s for _, s in self.scratch))
        return self._scratch_text

    # -- kexec ---------------------------------------------------------------------
    def kexec_load(self, cmdline: str | None = None, release: str | None = None,
                   abi: str | None = None) -> KexecImage:
        """kexec -s -l of the next kernel (another release's with abi); see kernel/kexec.py."""
        return kexec.kexec_load(self, cmdline, release, abi)

    def kexec_exec(self) -> Handover:
        """kexec -e: what reaches the next kernel; see kernel/kexec.py."""
        return kexec.kexec_exec(self)

    def status(self) -> dict:
        """This boot's state, as `khofs status --json` shows it."""
        out = self.kho_out
        return {
            "release": self.release,
            "previous_release": self.previous_release,
            "kexec_count": self.kexec_count,
            # 7.1: what the kexec-metadata blob told this kernel (null otherwise)
            "kexec_metadata": ({"previous_release": self.kho_in.previous_release,
                                "kexec_count": self.kho_in.kexec_count}
                               if self.kho_in is not None and self.profile.kexec_metadata
                               and self.kho_in.previous_release is not None else None),
            "abi": self.profile.name if self.profile else None,     # None: a kernel without KHO
            "memory_size": self.mem.size,
            "nodes": len(self.mem.nodes),
            "preserve_bits": self.profile.preserve_bits if self.profile else None,
            "cmdline": self.cmdline,
            "kho_enabled": self.kho_enable,
            "kho_in": self.kho_in is not None,
            "finalized": bool(out and out.finalized)
            if self.profile and self.profile.has_finalize else None,
            "scratch": [{"addr": a, "size": s} for a, s in self.scratch],
            "preserved_bytes": out.track.preserved_bytes() if out else 0,
            "incoming_preserved_bytes": self.preserved.total(),
            "image_loaded": self.image is not None,
            "kexec_loaded": self.image is not None,
            "kexec_crash_loaded": self.crash_image is not None,
            # the kernel hands over blobs of any format (kho-v3's blob-size), not only FDTs
            "any_blob": bool(self.profile and self.profile.blob_size),
            "kexec_notes": self.kexec_notes,
            "replay": self.replay,
        }

    def root_fdt(self) -> bytes | None:
        """The whole root FDT when this kernel keeps it live beyond what out/fdt shows (6.19+:
        out/fdt is sized once, and gone after a kexec); None otherwise."""
        if self.kho_out is None or not self.profile.fdt_at_boot:
            return None
        return self.kho_out.root_fdt()

    def memory_layout(self) -> dict:
        """What debugfs does not show of the physical layout (for khofs map)."""
        return {
            "nodes": [{"start": s, "end": e} for s, e in self.mem.nodes],
            "reserve_mem": [{"name": r.name, "start": r.start, "size": r.size}
                            for r in self.reserve_mem],
            # the root FDT's page: kexec passes it to the next kernel, debugfs never shows it
            "fdt_phys": self.kho_out.fdt_page if self.kho_out is not None else None,
            "in_fdt_phys": self.kho_in.fdt_phys if self.kho_in is not None else None,
            # what kho_mem_deserialize read; the map's own pages are free memory by now
            "incoming": [{"order": o, "start": p, "size": n} for o, p, n in self.incoming_runs],
        }


def _shown(param, val):
    return param if val is None else f"{param}={val}"
