"""The running system behind one mount: the current boot, kexec, reboot, the state dir."""

import errno
import os
import struct

from ..kernel.boot import BootArgs
from ..kernel.errors import KernelError
from ..kernel.handover import Handover
from ..kernel.machine import Machine
from ..kernel.replay import replay_lines

HANDOVER_FILE = "handover"


class Host:
    """The running system behind one mount: its machine and state dir. Each boot (a kexec,
    a reboot) replaces the machine and then runs the `on_boot` callbacks with it."""
    def __init__(self, machine: Machine, args: BootArgs | None = None,
                 state_dir: str | None = None, log=None):
        self.machine = machine
        self.args = args or BootArgs(machine.cmdline, machine.profile.name, machine.release,
                                     machine.config.memory, machine.config.nodes,
                                     machine.config.boot_reserved)
        self.state_dir = state_dir
        self.log = log or (lambda text: None)
        self.on_boot = []            # callbacks(machine) run after every boot but the first
        self.boots = 1               # boots of this host so far
        self.boot_log()

    @classmethod
    def boot(cls, args: BootArgs, state_dir: str | None = None, log=None):
        """Cold boot from args, or boot from the handover saved in the state dir."""
        machine = None
        if state_dir:
            prepare_state_dir(state_dir)
            saved = load_handover(state_dir)
            if saved is not None and args.handover is not None:
                raise ValueError(f"{state_dir} holds the handover of an earlier kexec: replay "
                                 "into an empty --state dir")
            if saved is not None:
                machine = BootArgs(handover=saved).boot()
        return cls(machine or args.boot(), args, state_dir, log)

    def boot_log(self) -> None:
        """Copy this boot's kernel log and kexec notes to the daemon's log."""
        for line in self.machine.dmesg:
            self.log(f"kernel: {line.text}")
        for note in self.machine.kexec_notes:
            self.log(f"khofs: kexec: {note}")
        for line in replay_lines(self.machine.replay):
            self.log(f"khofs: replay: {line}")

    def _booted(self, machine: Machine) -> None:
        self.machine = machine
        self.boots += 1
        for cb in self.on_boot:
            cb(machine)
        self.boot_log()

    def boot_report(self) -> dict:
        """What a user starting this boot is told: the replay's lines, the kernel's warnings,
        what of the command line had no effect and why, and what the kexec noticed."""
        m = self.machine
        return {"replay": replay_lines(m.replay), "warnings": [w.text for w in m.warnings()],
                "ignored": list(m.ignored), "kexec_notes": list(m.kexec_notes)}

    def kexec_load(self, cmdline=None, release=None, abi=None) -> dict:
        """kexec -s -l; what was loaded and whether it carries a handover."""
        img = self.machine.kexec_load(cmdline, release, abi)
        return {"cmdline": img.cmdline, "release": img.release, "abi": img.abi,
                "handover": img.fdt_phys is not None}

    def kexec_exec(self) -> dict:
        """kexec -e: boot the next kernel from the handover; its log and notes."""
        ho = self.machine.kexec_exec()
        if self.state_dir:
            save_handover(self.state_dir, ho)
        machine = BootArgs(handover=ho).boot()
        self._booted(machine)
        return {"kexec_count": machine.kexec_count, "release": machine.release,
                "kho_in": machine.kho_in is not None, "notes": ho.notes,
                "log": [line.text for line in machine.dmesg]}

    def reboot(self, defaults: bool = False, **changes) -> dict:
        """A cold boot in place: the machine a fresh mount with these arguments boots (the
        mount's, or with `defaults` khofs mount's defaults, with `changes`). Nothing of the
        old boot survives, not even in the state dir. Refused (KernelError, nothing changed)
        if the new kernel cannot boot."""
        unknown = set(changes) - set(BootArgs.FIELDS)
        if unknown:
            raise KernelError(errno.EINVAL, f"a reboot cannot change {', '.join(sorted(unknown))}")
        if self.args.handover is not None and (changes or defaults):
            raise KernelError(errno.EINVAL, "a --replay mount reboots into the recorded "
                              "kernel's successor as it was mounted; mount anew to change its "
                              "boot")
        args = (BootArgs() if defaults else self.args).replace(**changes)
        try:
            machine = args.boot()
        except ValueError as e:
            raise KernelError(errno.EINVAL, str(e)) from None
        if self.state_dir:
            drop_handover(self.state_dir)
        self.args = args
        self._booted(machine)
        return {"release": machine.release, "abi": machine.profile.name,
                "cmdline": machine.cmdline, "log": [line.text for line in machine.dmesg],
                "warnings": [line.text for line in machine.warnings()],
                "ignored": list(machine.ignored)}


def prepare_state_dir(path: str) -> None:
    """Create the state dir 0700 and drop a handover write a killed daemon left."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    for name in os.listdir(path):
        if name.startswith(HANDOVER_FILE + ".tmp"):
            os.unlink(os.path.join(path, name))       # a write that a killed daemon left


def load_handover(state_dir: str):
    """The handover kept in state_dir by the last kexec, or None."""
    path = os.path.join(state_dir, HANDOVER_FILE)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    try:
        return Handover.loads(data)
    except (ValueError, KeyError, TypeError, struct.error) as e:
        raise ValueError(f"{path} is not a usable handover: {e}") from None


def drop_handover(state_dir: str) -> None:
    """Forget the handover of the last kexec: the next mount of state_dir cold boots."""
    try:
        os.unlink(os.path.join(state_dir, HANDOVER_FILE))
    except FileNotFoundError:
        pass
    except OSError as e:
        raise KernelError(e.errno or errno.EIO, f"cannot remove the handover in {state_dir}: "
                          f"{e.strerror}; no reboot happened") from None


def save_handover(state_dir: str, ho: Handover) -> None:
    """Atomically: the old handover stays whole until the new one is complete on disk."""
    path = os.path.join(state_dir, HANDOVER_FILE)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(ho.dumps())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(state_dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise KernelError(e.errno or errno.EIO,
                          f"cannot write the handover to {state_dir}: {e.strerror}; "
                          "the previous state is intact and no kexec happened") from None
