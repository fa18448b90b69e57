import os
import subprocess
import sys

import pytest

pytest_plugins = ["pytester"]

KHOFS = [sys.executable, "-m", "khofs"]


def khofs(*args, **kw):
    return subprocess.run([*KHOFS, *map(str, args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, **kw)


def mounted(mnt) -> bool:
    target = os.path.realpath(mnt)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


@pytest.fixture
def mnt(tmp_path):
    """A mount point that is cleaned up whatever the test left there."""
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    if mounted(path):
        khofs("umount", path)
    if mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)
