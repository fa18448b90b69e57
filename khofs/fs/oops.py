"""What an oops of the emulated kernel (kernel/oops.py) does to the processes behind FUSE requests.

The oopsing task is the process that opened out/finalize (pyfuse3 passes a request context to
OPEN but not to WRITE): it is killed with SIGKILL, as the kernel's oops kills `current`. Later
reads and writes of out/finalize sleep as on the held kho_out.lock. The kernel's mutex_lock() sleep
cannot be interrupted, and pyfuse3 does not pass FUSE INTERRUPT on to handlers, so a signal
does not end them either: the kernel keeps a FUSE request that was already read by the daemon
waiting for its answer. They end when the machine goes down (a kexec or a reboot) or the daemon
stops (khofs umount, SIGTERM), all with EIO.
"""

import errno
import os
import signal

from ..kernel.errors import KernelError
from ..kernel.oops import LockHeld, Oops, Task, sleeper_line


def task_of(ctx) -> Task:
    """The task behind a FUSE request context: pid, uid and its /proc comm."""
    if ctx is None:
        return Task()
    try:
        with open(f"/proc/{ctx.pid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        comm = "?"
    return Task(ctx.pid, ctx.uid, comm)


def kill_oopsed(e: Oops, log) -> None:
    """SIGKILL the task that oopsed, and say so in the daemon's log with the kernel's lines."""
    task = e.record.task
    # pid 0: the writer lives in a pid namespace the daemon cannot see.
    if task.pid > 1 and task.pid != os.getpid():
        try:
            os.kill(task.pid, signal.SIGKILL)
            log(f"khofs: killed {task.comm} (pid {task.pid}) with SIGKILL: it oopsed in "
                "kho_finalize")
        except ProcessLookupError:
            pass


class HeldLock:
    """Requests asleep on a kho_out.lock an oops left held. `current` gives the running
    boot's KhoOut: a sleeper wakes once its own kernel is gone, or when the daemon stops.
    `new_event` is the event loop's Event (only fs/fuse.py knows the loop)."""

    def __init__(self, current, new_event):
        self.current = current
        self.new_event = new_event
        self.stopping = False
        self._wake = new_event()

    async def sleep(self, held: LockHeld, opcode: str, release: str, log) -> None:
        """Sleep until the held lock's kernel is gone; then EIO (the caller's kernel is)."""
        kho = held.kho_out
        log(sleeper_line(f"FUSE {opcode} ({held.what})", release))
        kho.oops.lock_waiters += 1
        try:
            while not self.stopping and self.current() is kho:
                await self._wake.wait()
        finally:
            kho.oops.lock_waiters -= 1
        why = "the daemon stops" if self.stopping else "the kernel that held it is gone"
        raise KernelError(errno.EIO, f"kho_out.lock sleeper released: {why}")

    def wake(self) -> None:
        """Let sleepers look again whether their kernel still runs (after a state change)."""
        ev, self._wake = self._wake, self.new_event()
        ev.set()

    def stop(self) -> None:
        """The daemon is stopping: answer every sleeper."""
        self.stopping = True
        self.wake()
