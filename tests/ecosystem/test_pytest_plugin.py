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


REUSE = '''
import json, os, signal, time
import pytest
from khofs import runtime

def record(khofs, name):
    with open(os.environ["KHOFS_RECORD"], "a") as f:
        f.write(json.dumps([name, str(khofs.root), runtime.read_info(str(khofs.root))["pid"]])
                + "\\n")

@pytest.mark.khofs(cmdline="kho=on reserve_mem=4M:4096:oops", args=["--memory", "1G"])
def test_a_dirty(khofs):
    record(khofs, "a")
    khofs.ctl.preserve(khofs.ctl.mem_alloc(4096), 4096)
    khofs.finalize()
    khofs.kexec(release="9.9.9-dirty")
    assert khofs.status()["kexec_count"] == 1

@pytest.mark.khofs(cmdline="kho=on reserve_mem=4M:4096:oops", args=["--memory=1G"])
def test_b_clean(khofs):
    record(khofs, "b")
    st = khofs.status()
    assert (st["kexec_count"], st["release"], st["memory_size"]) == (0, "6.18.0-khofs", 1 << 30)
    assert sorted(os.listdir(khofs.kho)) == ["out"]
    assert (khofs.out / "finalize").read_bytes() == b"0\\n"

@pytest.mark.khofs(abi="7.1", release="7.1.5-x", args=["--nodes", "2"])
def test_c_marker(khofs):
    record(khofs, "c")
    st = khofs.status()
    assert (st["abi"], st["release"], st["nodes"], st["cmdline"]) == ("7.1", "7.1.5-x", 2, "kho=on")
    assert st["memory_size"] == 4 << 30

def test_d_defaults(khofs):
    record(khofs, "d")
    st = khofs.status()
    assert (st["abi"], st["release"], st["nodes"], st["memory_size"]) == ("6.18", "6.18.0-khofs", 1, 4 << 30)

@pytest.mark.khofs(args=["--cache", "page"])
def test_e_fuse_option(khofs):
    record(khofs, "e")

@pytest.mark.khofs(fresh=True)
def test_f_fresh(khofs):
    record(khofs, "f")

def test_g_fresh_fixture(khofs_fresh):
    record(khofs_fresh, "g")

def test_h_kills(khofs):
    record(khofs, "h")
    os.kill(runtime.read_info(str(khofs.root))["pid"], signal.SIGKILL)

def test_i_after_kill(khofs):
    record(khofs, "i")
    assert khofs.status()["kexec_count"] == 0

def test_j_wedges(khofs):
    record(khofs, "j")
    os.kill(runtime.read_info(str(khofs.root))["pid"], signal.SIGSTOP)

def test_k_after_wedge(khofs):
    record(khofs, "k")
    assert khofs.status()["kexec_count"] == 0

@pytest.mark.khofs(cmdline="kho=on kho_scratch=32M,96M,32M")
def test_l_scratch(khofs):
    record(khofs, "l")
    assert (khofs.out / "scratch_len").read_bytes() == b"0x2000000\\n0x6000000\\n0x2000000\\n"
    assert khofs.mount_stderr == ""

# What the mount would have said, a reboot says too.
WHY = ("kernel: KHO: Failed to reserve scratch area, disabling kexec handover\\n"
       "khofs: kho=on: KHO disabled, the scratch areas do not fit in free simulated memory\\n")

@pytest.mark.khofs(cmdline="kho=on kho_scratch=1G,1G,1G", args=["--memory", "1G"])
def test_m_warnings(khofs):
    record(khofs, "m")
    assert khofs.mount_stderr == WHY

@pytest.mark.khofs(cmdline="kho=on kho_scratch=1G,1G,1G", args=["--memory", "1G"], fresh=True)
def test_n_warnings_fresh(khofs):
    record(khofs, "n")
    assert khofs.mount_stderr == WHY
'''


def test_one_mount_per_process_rebooted_for_each_test(pytester, tmp_path, monkeypatch):
    record = tmp_path / "mounts"
    monkeypatch.setenv("KHOFS_RECORD", str(record))
    pytester.makepyfile(test_reuse=REUSE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=14)
    import json
    seen = {name: (root, pid) for name, root, pid in map(json.loads, record.read_text().split("\n")[:-1])}
    shared = seen["a"]
    # One mount for the rebootable tests, one of their own for the others.
    assert seen["b"] == seen["c"] == seen["d"] == seen["h"] == shared
    for own in "efg":
        assert seen[own][0] != shared[0] and seen[own][1] != shared[1]
    # A killed daemon, then a wedged one, are replaced by a new mount.
    assert seen["i"] == seen["j"] and seen["i"][0] != shared[0]
    assert seen["k"] == seen["l"] == seen["m"] and seen["k"][0] != seen["i"][0]
    for root, _ in seen.values():
        assert not _mounted(root), f"{root} is still mounted"


def test_each_xdist_worker_reuses_its_own_mount(pytester, tmp_path, monkeypatch):
    record = tmp_path / "mounts"
    monkeypatch.setenv("KHOFS_RECORD", str(record))
    tests = "\n".join(f'''
def test_{i}(khofs):
    import json, os
    from khofs import runtime
    khofs.finalize()
    with open(os.environ["KHOFS_RECORD"], "a") as f:
        f.write(json.dumps([os.environ["PYTEST_XDIST_WORKER"], str(khofs.root)]) + "\\n")
    assert khofs.status()["finalized"] is True
''' for i in range(8))
    pytester.makepyfile(test_xdist=tests)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=8)
    import json
    rows = [json.loads(line) for line in record.read_text().split("\n")[:-1]]
    roots = {}
    for worker, root in rows:
        roots.setdefault(worker, set()).add(root)
    assert sorted(roots) == ["gw0", "gw1"]
    assert all(len(r) == 1 for r in roots.values())
    assert roots["gw0"] != roots["gw1"]
    for (root,) in roots.values():
        assert not _mounted(root)
