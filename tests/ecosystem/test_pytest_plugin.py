"""The pytest plugin: the khofs fixture and marker, and cleanup whatever happens."""

import pytest

pytestmark = pytest.mark.fuse

EXAMPLE = '''
import os
import pytest

@pytest.mark.khofs(cmdline="kho=on reserve_mem=4M:4096:oops", args=["--memory", "1G"])
def test_handover(khofs):
    assert (khofs.out / "finalize").read_bytes() == b"0\\n"
    khofs.finalize()
    assert sorted(os.listdir(khofs.out / "sub_fdts")) == ["memblock"]
    out_fdt = (khofs.out / "fdt").read_bytes()
    khofs.kexec()
    assert (khofs.in_ / "fdt").read_bytes() == out_fdt
    assert khofs.status()["kexec_count"] == 1
    assert "Revived memory reservation 'oops' from KHO" in khofs.log()
    open(os.environ["KHOFS_RECORD"], "a").write(str(khofs.root) + "\\n")

def test_default_cmdline(khofs):
    assert os.listdir(khofs.kho) == ["out"]
    open(os.environ["KHOFS_RECORD"], "a").write(str(khofs.root) + "\\n")

def test_fails_but_unmounts(khofs):
    open(os.environ["KHOFS_RECORD"], "a").write(str(khofs.root) + "\\n")
    assert False, "this test fails on purpose"

def test_daemon_killed_still_unmounts(khofs):
    import json, signal
    from khofs import runtime
    open(os.environ["KHOFS_RECORD"], "a").write(str(khofs.root) + "\\n")
    info = runtime.read_info(str(khofs.root))
    os.kill(info["pid"], signal.SIGKILL)
'''


def _mounted(path):
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def test_fixture_marker_and_cleanup(pytester, tmp_path, monkeypatch):
    record = tmp_path / "mounts"
    monkeypatch.setenv("KHOFS_RECORD", str(record))
    pytester.makepyfile(test_example=EXAMPLE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, failed=1)
    roots = record.read_text().split()
    assert len(roots) == 4
    for root in roots:
        assert not _mounted(root), f"{root} is still mounted"


def test_marker_is_registered(pytester):
    result = pytester.runpytest_subprocess("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.khofs(*"])
