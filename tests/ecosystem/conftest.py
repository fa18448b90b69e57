import subprocess
import sys
from pathlib import Path

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


@pytest.fixture
def khofs_on_path(tmp_path):
    """mount.fuse runs `khofs` through /bin/sh with mount's sanitized PATH, which includes
    /usr/local/bin: link the venv's khofs there for the test, as scripts/install.sh does."""
    link = Path("/usr/local/bin/khofs")
    created = False
    if not link.exists():
        link.symlink_to(Path(sys.executable).with_name("khofs"))
        created = True
    yield
    if created:
        link.unlink()
