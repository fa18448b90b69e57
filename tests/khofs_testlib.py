"""Helpers every suite shares: running the khofs command, asking the kernel about mounts,
and cleaning up after a fixture."""

import contextlib
import os
import subprocess
import sys
import time

KHOFS = [sys.executable, "-m", "khofs"]


def run_khofs(*args, check=False, timeout=30, input=None, **kw):
    """`khofs ARGS` in a subprocess (stdin empty unless input is given); bytes out unless
    text=True; with check, a nonzero exit fails the test with its stderr."""
    if input is None and "stdin" not in kw:
        kw["stdin"] = subprocess.DEVNULL
    r = subprocess.run(KHOFS + [str(a) for a in args], capture_output=True, timeout=timeout,
                       input=input, **kw)
    if check and r.returncode != 0:
        err = r.stderr if isinstance(r.stderr, str) else r.stderr.decode(errors="replace")
        raise AssertionError(f"khofs {' '.join(map(str, args))} exited {r.returncode}:\n{err}")
    return r


def mount_count(path) -> int:
    """How many mounts sit on path, from /proc/self/mountinfo."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return sum(1 for line in f if line.split()[4] == target)


def is_mounted(path) -> bool:
    """Whether anything is mounted on path."""
    return mount_count(path) > 0


def wait_for(pred, timeout=10.0, what="condition", interval=0.01):
    """pred()'s first true value, polled; fails the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def cleaned_up(obj):
    """obj for the with-block (a fixture's yield); obj.cleanup() runs whatever happened."""
    try:
        yield obj
    finally:
        obj.cleanup()
