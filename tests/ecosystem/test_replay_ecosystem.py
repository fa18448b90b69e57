"""A snapshot replayed through mount(8) (`-o replay=`) and the pytest fixture (`replay=`)."""

import subprocess

import pytest

from ecohelp import khofs, mounted

pytestmark = pytest.mark.fuse

CMDLINE = "kho=on reserve_mem=4M:4096:oops"


@pytest.fixture
def snapshot(tmp_path):
    """A finalized 6.18 khofs tree recorded in a snapshot file."""
    src = tmp_path / "src"
    src.mkdir()
    assert khofs("mount", src, "--cmdline", CMDLINE, "--memory", "1G").returncode == 0
    try:
        (src / "kho/out/finalize").write_bytes(b"1\n")
        snap = tmp_path / "src.khosnap"
        assert khofs("record", snap, "--from", src).returncode == 0
        yield snap, (src / "kho/out/sub_fdts/memblock").read_bytes()
    finally:
        khofs("umount", src)


def test_mount_t_fuse_khofs_replay(mnt, snapshot, khofs_on_path):
    snap, memblock = snapshot
    r = subprocess.run(["mount", "-t", "fuse.khofs", "none", str(mnt), "-o", f"replay={snap}"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (mnt / "kho/in/sub_fdts/memblock").read_bytes() == memblock
    log = khofs("ctl", mnt, "log").stdout.splitlines()
    assert "Revived memory reservation 'oops' from KHO" in log
    assert khofs("umount", mnt).returncode == 0
    assert not mounted(mnt)


EXAMPLE = '''
import os
import pytest

@pytest.mark.khofs(replay=os.environ["SNAPSHOT"])
def test_successor(khofs):
    assert os.listdir(khofs.in_ / "sub_fdts") == ["memblock"]
    st = khofs.status()
    assert st["cmdline"] == "kho=on reserve_mem=4M:4096:oops"      # the recorded one
    assert st["replay"]["recorded_release"] == "6.18.0-khofs"
    assert "Revived memory reservation 'oops' from KHO" in khofs.log()

@pytest.mark.khofs(replay=os.environ["SNAPSHOT"], cmdline="kho=on")
def test_successor_with_its_own_cmdline(khofs):
    assert khofs.status()["cmdline"] == "kho=on"
    assert "Revived memory reservation 'oops' from KHO" not in khofs.log()
'''


def test_fixture_replays_a_snapshot(pytester, snapshot, monkeypatch):
    monkeypatch.setenv("SNAPSHOT", str(snapshot[0]))
    pytester.makepyfile(test_replay_example=EXAMPLE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
