import subprocess

import pytest

from ecohelp import khofs, mounted


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
