"""One boot of the emulated machine: command line, memory, KHO state."""

from dataclasses import dataclass, field

from .cmdline import parameq, split_cmdline
from .errors import KernelError
from .kho import KhoOut
from .kstrtox import kstrtobool
from .physmem import SZ_1M, Kmalloc, Memblock, PageAllocator, PhysMem
from .producers.memblock import MemblockProducer, parse_reserve_mem
from .profile import get_profile, DEFAULT_PROFILE
from .scratch import ScratchConfig, format_lines, parse_kho_scratch, reserve_scratch

KERNEL_LOAD_ADDR = 16 * SZ_1M     # x86 LOAD_PHYSICAL_ADDR: where boot reservations start


@dataclass
class MachineConfig:
    memory: int = 4 << 30
    nodes: int = 1
    boot_reserved: int = 64 << 20
    abi: str = DEFAULT_PROFILE


@dataclass
class LogLine:
    level: str        # "err", "warn", "notice", "info"
    text: str


class Machine:
    def __init__(self, cmdline: str = "kho=on", config: MachineConfig | None = None):
        self.config = config = config or MachineConfig()
        self.cmdline = cmdline
        self.profile = get_profile(config.abi)
        self.dmesg: list[LogLine] = []
        # What of the command line had no effect, and why (the kernel is often silent on it).
        self.ignored: list[str] = []
        self.mem = PhysMem(config.memory, config.nodes)
        self.memblock = Memblock(self.mem)
        # Firmware's low 1 MiB, then the kernel image and its early allocations.
        self.memblock.reserve(0, SZ_1M)
        if KERNEL_LOAD_ADDR + config.boot_reserved > self.mem.nodes[0][1]:
            raise ValueError("--boot-reserved does not fit in node 0")
        self.memblock.reserve(KERNEL_LOAD_ADDR, config.boot_reserved, kern=True)

        self.kho_enable = False
        self.scratch_cfg = ScratchConfig()
        self.reserve_mem: list = []
        params = split_cmdline(cmdline)
        self._early_params(params)
        self._setup_params(params)

        self.scratch_array = 0
        self.scratch: list[tuple[int, int]] = []
        if self.kho_enable:
            res = reserve_scratch(self.memblock, self.scratch_cfg)
            if res is None:
                self.kho_enable = False
                if self.profile.scratch_fail_warns:
                    self.warn("KHO: Failed to reserve scratch area, disabling kexec handover")
                self.ignored.append("kho=on: KHO disabled, the scratch areas do not fit in "
                                    "free simulated memory")
            else:
                self.scratch_array, self.scratch = res
        self.pages = PageAllocator(self.mem, self.memblock, [(a, a + s) for a, s in self.scratch])
        self.kmalloc = Kmalloc(self.pages)
        self.kho_out = None
        if self.kho_enable:
            self.kho_out = KhoOut(self.mem, self.pages, self.kmalloc, self.profile, self.info)
            if self.reserve_mem:
                self.kho_out.register_notifier(MemblockProducer(self.kho_out, self.reserve_mem))

    # -- logging ------------------------------------------------------------
    def info(self, text: str) -> None:
        self.dmesg.append(LogLine("info", text))

    def warn(self, text: str) -> None:
        self.dmesg.append(LogLine("warn", text))

    def warnings(self):
        return [line for line in self.dmesg if line.level in ("warn", "err")]

    # -- early parameters -----------------------------------------------------
    def _early_params(self, params) -> None:
        for param, val in params:
            try:
                if parameq(param, "kho"):
                    self.kho_enable = kstrtobool(val)
                elif parameq(param, "kho_scratch"):
                    msg = parse_kho_scratch(val, self.scratch_cfg, self.profile.strict_scratch)
                    self.info("KHO: " + msg)
            except KernelError as e:
                self.warn(f"Malformed early option '{param}'")
                self.ignored.append(f"{_shown(param, val)}: ignored, {e.message}")

    def _setup_params(self, params) -> None:
        """__setup() parameters, parsed after the early ones; their errors are silent."""
        for param, val in params:
            if param == "reserve_mem":
                try:
                    parse_reserve_mem(val, self.reserve_mem, self.memblock)
                except KernelError as e:
                    self.ignored.append(f"{_shown(param, val)}: ignored, {e.message}")

    # -- what debugfs shows ------------------------------------------------------
    def scratch_phys_text(self) -> bytes:
        return format_lines(a for a, _ in self.scratch)

    def scratch_len_text(self) -> bytes:
        return format_lines(s for _, s in self.scratch)


def _shown(param, val):
    return param if val is None else f"{param}={val}"
