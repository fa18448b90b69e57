"""What a cold boot is made of: the arguments `khofs mount` and `khofs reboot` boot with."""

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:       # the machine is imported when it boots: the CLI reads the defaults
    from .handover import Handover
    from .machine import Machine, MachineConfig

DEFAULT_MEMORY = 4 << 30
DEFAULT_BOOT_RESERVED = 64 << 20


@dataclass(frozen=True)
class BootArgs:
    """The machine and command line of a cold boot. A mount boots from one; a reboot boots
    from the mount's with the given fields replaced, so both take the same path."""
    cmdline: str = "kho=on"
    abi: str | None = None              # None: the profile the release names, else the default
    release: str | None = None          # uname -r; None: the profile's
    memory: int = DEFAULT_MEMORY
    nodes: int = 1
    boot_reserved: int = DEFAULT_BOOT_RESERVED
    # khofs mount --replay: the recorded kernel's successor boots from this handover instead.
    # Machine copies its pages, so one handover boots any number of times.
    handover: "Handover | None" = None

    # What `khofs reboot` may change.
    FIELDS = ("cmdline", "abi", "release", "memory", "nodes", "boot_reserved")

    def config(self) -> "MachineConfig":
        """The emulated hardware and profile."""
        from .machine import MachineConfig
        return MachineConfig(memory=self.memory, nodes=self.nodes,
                             boot_reserved=self.boot_reserved, abi=self.abi, release=self.release)

    def boot(self) -> "Machine":
        """A new boot of the machine; ValueError or KernelError if it cannot boot."""
        from .machine import Machine, MachineConfig
        ho = self.handover
        if ho is not None:
            return Machine(ho.cmdline, MachineConfig(**ho.config), ho, release=ho.release)
        return Machine(self.cmdline, self.config())

    def replace(self, **changes) -> "BootArgs":
        """These arguments with some fields changed."""
        return dataclasses.replace(self, **changes)
