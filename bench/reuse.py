"""What a fresh kernel per test costs: the pytest fixture, `khofs reboot`, and `khofs mount`
against the bare pyfuse3 + trio floor (bench/floor.py). Every pair measured interleaved in
this one run, so a change in the machine's load hits both sides alike.

    .venv/bin/python bench/reuse.py [--quick]

1. the `khofs` fixture's cost per test (setup + teardown) over an empty fixture's, with the
   reused mount, and with a mount per test (`fresh=True`), timed by pytest itself
2. `Client.reboot()` and the `khofs reboot` command
3. `khofs mount` until ready against the floor until it answers a stat
4. 16 `khofs mount`s at once against 16 floors
Needs root and /dev/fuse. Not part of the tests.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from run import KHOFS, mounted, parallel_floors, parallel_mounts  # noqa: E402

GOALS = {"fixture": 10.0, "mount": 1.15, "parallel": 1.15}

SUITE = '''
import pytest

@pytest.fixture
def empty():
    yield None

@pytest.mark.khofs(cmdline="kho=on reserve_mem=4M:4096:oops", args=["--memory", "1G"])
def test_reused_{i}(khofs):
    khofs.finalize()

def test_empty_{i}(empty):
    pass
'''
FRESH = '''
@pytest.mark.khofs(cmdline="kho=on reserve_mem=4M:4096:oops", args=["--memory", "1G"], fresh=True)
def test_fresh_{i}(khofs):
    khofs.finalize()
'''
TIMER = '''
import json, os

def pytest_runtest_logreport(report):
    if report.when in ("setup", "teardown"):
        with open(os.environ["BENCH_TIMES"], "a") as f:
            f.write(json.dumps([report.nodeid.split("::")[-1], report.duration]) + "\\n")
'''


def fixture_overhead(work: str, n: int, fresh: int) -> dict:
    """Median setup + teardown seconds per test, by kind of fixture."""
    d = os.path.join(work, "suite")
    os.mkdir(d)
    # Reused and empty tests alternate; the mount-per-test ones sit among them.
    body = "".join(SUITE.replace("{i}", str(i)) + (FRESH.replace("{i}", str(i)) if i < fresh
                                                   else "")
                   for i in range(n))
    body = "import pytest\n" + body.replace("import pytest\n", "")
    with open(os.path.join(d, "test_bench.py"), "w") as f:
        f.write(body)
    with open(os.path.join(d, "conftest.py"), "w") as f:
        f.write(TIMER)
    times = os.path.join(work, "times")
    env = dict(os.environ, BENCH_TIMES=times)
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                    "no:randomly", d], check=True, env=env, cwd=d, stdout=subprocess.DEVNULL)
    per_test = {}
    with open(times) as f:
        for line in f:
            name, dur = json.loads(line)
            per_test[name] = per_test.get(name, 0) + dur
    out = {}
    for kind in ("reused", "empty", "fresh"):
        vals = [v for k, v in per_test.items() if k.startswith(f"test_{kind}_")]
        # The first reused test mounts: that one is the session's, not a test's.
        if kind == "reused":
            vals = vals[1:]
        out[kind] = statistics.median(vals)
    return out


def reboot_latency(work: str, n: int) -> tuple:
    """Median seconds of Client.reboot() and of the `khofs reboot` command."""
    from khofs.client import Client
    mnt = os.path.join(work, "reboot")
    os.mkdir(mnt)
    subprocess.check_call([*KHOFS, "mount", mnt, "--cmdline", "kho=on reserve_mem=4M:4096:oops",
                           "--memory", "1G"])
    try:
        calls, cmds = [], []
        with Client(mnt) as c:
            for i in range(n):
                t0 = time.perf_counter()
                c.reboot()
                calls.append(time.perf_counter() - t0)
                if i % 10 == 0:
                    t0 = time.perf_counter()
                    subprocess.check_call([*KHOFS, "reboot", mnt], stdout=subprocess.DEVNULL)
                    cmds.append(time.perf_counter() - t0)
        return statistics.median(calls), statistics.median(cmds)
    finally:
        subprocess.call([*KHOFS, "umount", mnt])


def mount_vs_floor(work: str, rounds: int) -> tuple:
    """Median seconds to ready of `khofs mount` and of the floor, in alternate rounds."""
    mnt, fmnt = os.path.join(work, "m"), os.path.join(work, "f")
    os.mkdir(mnt)
    os.mkdir(fmnt)
    khofs, floor = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        subprocess.check_call([*KHOFS, "mount", mnt])
        khofs.append(time.perf_counter() - t0)
        subprocess.check_call([*KHOFS, "umount", mnt])
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, os.path.join(HERE, "floor.py"), fmnt, "keep_cache"])
        while not mounted(fmnt):
            time.sleep(0.001)
        os.stat(os.path.join(fmnt, "file"))
        floor.append(time.perf_counter() - t0)
        subprocess.check_call(["fusermount3", "-u", fmnt])
        p.wait(10)
    return statistics.median(khofs), statistics.median(floor)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    # An editable install run with PYTHONDONTWRITEBYTECODE would compile khofs every time.
    subprocess.run([sys.executable, "-m", "compileall", "-q", "khofs"], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    q = args.quick
    with tempfile.TemporaryDirectory(prefix="khofs-reuse-") as work:
        fx = fixture_overhead(work, 20 if q else 60, 5 if q else 10)
        call, cmd = reboot_latency(work, 100 if q else 500)
        m, f = mount_vs_floor(work, 5 if q else 11)
        pm, pf = [], []
        for i in range(1 if q else 3):
            os.mkdir(pdir := os.path.join(work, f"par{i}"))
            pm.append(parallel_mounts(pdir))
            pf.append(parallel_floors(pdir))
    pm, pf = statistics.median(pm), statistics.median(pf)
    over = (fx["reused"] - fx["empty"]) * 1000
    print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.2f}\n")
    print(f"{'':<44}{'measured':>12}{'goal':>10}")
    print(f"{'1. fixture overhead per test, reused (ms)':<44}{over:>12.2f}"
          f"{'<= ' + str(GOALS['fixture']):>10}")
    print(f"{'   ... mount per test, fresh=True (ms)':<44}"
          f"{(fx['fresh'] - fx['empty']) * 1000:>12.1f}")
    print(f"{'   empty fixture setup+teardown (ms)':<44}{fx['empty'] * 1000:>12.2f}")
    print(f"{'2. Client.reboot() (ms)':<44}{call * 1000:>12.2f}")
    print(f"{'   khofs reboot command (ms)':<44}{cmd * 1000:>12.1f}")
    print(f"{'3. khofs mount to ready (ms)':<44}{m * 1000:>12.1f}")
    print(f"{'   pyfuse3 floor to ready (ms)':<44}{f * 1000:>12.1f}")
    print(f"{'   ratio':<44}{m / f:>12.2f}{'<= ' + str(GOALS['mount']):>10}")
    print(f"{'4. 16 khofs mounts at once (s)':<44}{pm:>12.2f}")
    print(f"{'   16 floors at once (s)':<44}{pf:>12.2f}")
    print(f"{'   ratio':<44}{pm / pf:>12.2f}{'<= ' + str(GOALS['parallel']):>10}")


if __name__ == "__main__":
    main()
