"""Helpers shared by the ecosystem tests."""

import os
import subprocess
import sys

KHOFS = [sys.executable, "-m", "khofs"]


def khofs(*args, **kw):
    return subprocess.run([*KHOFS, *map(str, args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, **kw)


def mounted(mnt) -> bool:
    target = os.path.realpath(mnt)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)
