"""The oops a 7.0 finalize takes on a corrupted live root FDT, and the kho_out.lock it leaves held.

On 6.19/7.0, kho_finalize() holds kho_out.lock (an uninterruptible mutex) while
kho_update_memory_map() asks fdt_getprop_w() for the root's preserved-memory-map and stores
the new map's address through what it gets. On a root FDT libfdt no longer reads (a write
into out/fdt replaced its magic) that is NULL: a kernel NULL pointer dereference at address 0,
the writing task is killed, the mutex is never unlocked and every later taker of it sleeps
until the machine goes down (a kexec or a reboot).
"""

import errno
from dataclasses import dataclass

from .errors import KernelError

BUG_LINE = "BUG: kernel NULL pointer dereference, address: 0000000000000000"
FUNCTION = "kho_finalize"
# print_tainted(): "G" (no proprietary module), then one column per taint flag in the order
# F S R M B U D ...; TAINT_DIE is the 8th flag, set when an oops ends.
TAINT_AFTER_OOPS = "G      D"
CAUSE_OUT_FDT = "a write into out/fdt corrupted the live root FDT"
CAUSE_OTHER = "the live root FDT was corrupted (not through out/fdt)"
FDT_MAGIC = bytes.fromhex("d00dfeed")
# The callers of kho_finalize on a write of out/finalize, innermost first (x86_64).
CALL_TRACE = ("kho_out_finalize_set", "simple_attr_write_xsigned", "debugfs_attr_write",
              "full_proxy_write", "vfs_write", "ksys_write", "do_syscall_64",
              "entry_SYSCALL_64_after_hwframe")


@dataclass(frozen=True)
class Task:
    """The task that made a request (the kernel's `current`)."""
    pid: int = 0
    uid: int = 0
    comm: str = "?"


class Oops(KernelError):
    """The calling task oopsed: it never returns from the call (the kernel kills it).
    Uncaught, the call fails with EIO."""

    def __init__(self, record: "OopsRecord", lines: list[str]):
        super().__init__(errno.EIO, f"{BUG_LINE} in {FUNCTION}: {record.cause}")
        self.record = record
        self.lines = lines          # what the kernel logged


class LockHeld(KernelError):
    """The call would sleep on kho_out.lock, which the oopsed task holds for ever. Callers that
    can sleep do (fs/oops.py); the others are answered EDEADLK."""

    def __init__(self, kho_out, what: str):
        super().__init__(errno.EDEADLK, f"{what} would sleep on kho_out.lock, held since the "
                         f"oops in {FUNCTION}: it ends only with a kexec or a reboot")
        self.kho_out = kho_out
        self.what = what


@dataclass
class OopsRecord:
    """What the oops left behind: who died, why, and who sleeps on the lock now."""
    task: Task
    cause: str
    magic: bytes
    lock_waiters: int = 0

    def status(self) -> dict:
        """The oops as `khofs status --json` shows it."""
        return {"bug": BUG_LINE, "function": FUNCTION, "cause": self.cause,
                "pid": self.task.pid, "comm": self.task.comm, "lock": "kho_out.lock",
                "lock_waiters": self.lock_waiters}


def oops_lines(task: Task, release: str) -> list[str]:
    """The kernel log of the oops (x86_64): the lines a user greps for. Register dumps, code
    bytes and symbol offsets depend on the build and are not reproduced."""
    return [
        BUG_LINE,
        "#PF: supervisor write access in kernel mode",
        "#PF: error_code(0x0002) - not-present page",
        "Oops: 0002 [#1] SMP NOPTI",
        # TAINT_DIE is added only when this oops ends.
        f"CPU: 0 UID: {task.uid} PID: {task.pid} Comm: {task.comm} Not tainted {release} #1",
        f"RIP: 0010:{FUNCTION}",
        "Call Trace:",
        " <TASK>",
        *(f" {fn}" for fn in CALL_TRACE),
        " </TASK>",
        "CR2: 0000000000000000",
        "---[ end trace 0000000000000000 ]---",
    ]


def cause_line(record: OopsRecord) -> str:
    """khofs's own line naming the misuse behind the oops."""
    what = (f"its first bytes are now {record.magic.hex(' ')}, not d0 0d fe ed"
            if record.magic != FDT_MAGIC else "libfdt no longer finds its properties")
    return (f"khofs: oops cause: {record.cause} ({what}): {FUNCTION} found no "
            "preserved-memory-map and stored the map's address through NULL; the writer was "
            "killed and kho_out.lock stays held until a kexec or a reboot")


def sleeper_line(who: str, release: str) -> str:
    """What the hung-task detector would say of a request asleep on the held lock."""
    return (f"khofs: {who} sleeps on kho_out.lock, held since the oops in {FUNCTION} "
            f"(Tainted: {TAINT_AFTER_OOPS} {release})")
