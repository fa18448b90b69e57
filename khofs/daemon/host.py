"""The running system behind one mount: the current boot, its debugfs tree, kexec, state dir."""

import errno
import os
import struct

from ..fs.debugfs import Tree
from ..kernel.errors import KernelError
from ..kernel.handover import Handover
from ..kernel.machine import Machine, MachineConfig
from ..kernel.replay import replay_lines

HANDOVER_FILE = "handover"


class Host:
    """The running system behind one mount: its machine, debugfs tree and state dir."""
    def __init__(self, machine: Machine, state_dir: str | None = None, log=None):
        self.machine = machine
        self.tree = Tree(machine)
        self.state_dir = state_dir
        self.log = log or (lambda text: None)
        self.on_new_tree = []        # callbacks(tree) run after a kexec
        # (parent inode, name) of the old boot's entries the kernel may still have cached.
        self.stale_entries: list[tuple[int, str]] = []
        self.boot_log()

    @classmethod
    def boot(cls, cmdline: str, config: MachineConfig, state_dir: str | None = None, log=None,
             handover: Handover | None = None):
        """Cold boot, boot from the handover saved in the state dir, or from handover (a
        replayed snapshot's)."""
        if state_dir:
            prepare_state_dir(state_dir)
            saved = load_handover(state_dir)
            if saved is not None and handover is not None:
                raise ValueError(f"{state_dir} holds the handover of an earlier kexec: replay "
                                 "into an empty --state dir")
            handover = handover or saved
        if handover is not None:
            machine = Machine(handover.cmdline, MachineConfig(**handover.config), handover,
                              release=handover.release)
        else:
            machine = Machine(cmdline, config)
        return cls(machine, state_dir, log)

    def boot_log(self) -> None:
        """Copy this boot's kernel log and kexec notes to the daemon's log."""
        for line in self.machine.dmesg:
            self.log(f"kernel: {line.text}")
        for note in self.machine.kexec_notes:
            self.log(f"khofs: kexec: {note}")
        for line in replay_lines(self.machine.replay):
            self.log(f"khofs: replay: {line}")

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
        machine = Machine(ho.cmdline, MachineConfig(**ho.config), ho, release=ho.release)
        self.machine = machine
        for node in self.tree.nodes.values():
            node.gone = True          # nothing of the old kernel's debugfs survives
            if node is not self.tree.root:
                self.stale_entries.append((node.parent.ino, node.name))
        self.tree = Tree(machine, last_ino=self.tree._ino)
        for cb in self.on_new_tree:
            cb(self.tree)
        self.boot_log()
        return {"kexec_count": machine.kexec_count, "release": machine.release,
                "kho_in": machine.kho_in is not None, "notes": ho.notes,
                "log": [line.text for line in machine.dmesg]}


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
