"""khofs benchmark: one command, one table; each row measured side by side in this run.

    .venv/bin/python bench/run.py [--quick]

Rows are ratios to the floor of this stack measured in the same run: a bare pyfuse3 + trio
one-file file system (bench/floor.py) opened with keep_cache and with direct_io; a regular
file on local disk and libfuse's C example hello_ll (built here from Debian's libfuse3-dev
examples) are the C references. Reads are timed by a small C reader (bench/reader.c) so
Python's own microseconds stay out. Needs root and /dev/fuse. Not part of the tests.
"""

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
KHOFS = [sys.executable, "-m", "khofs"]
HELLO_SRC = "/usr/share/doc/libfuse3-dev/examples/hello_ll.c"


def mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def wait_mounted(path: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not mounted(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not mount")
        time.sleep(0.005)


def build_hello_ll(workdir: str) -> str:
    exe = os.path.join(workdir, "hello_ll")
    flags = subprocess.check_output(["pkg-config", "fuse3", "--cflags", "--libs"], text=True).split()
    subprocess.check_call(["cc", "-O2", "-Wall", HELLO_SRC, "-o", exe, *flags])
    return exe


def build_reader(workdir: str) -> str:
    exe = os.path.join(workdir, "reader")
    subprocess.check_call(["cc", "-O2", "-Wall", os.path.join(HERE, "reader.c"), "-o", exe])
    return exe


def read_latency(reader: str, paths: dict, n: int, chunk: int = 100) -> dict:
    """open + read to EOF + close, n times per path, timed by the C reader: {name: (median
    us, p90 us)}. Paths take turns in chunks, so a change in the machine's load while the
    benchmark runs hits every row alike and the ratios stay comparable."""
    out = subprocess.check_output([reader, str(n), str(chunk), *paths.values()], text=True)
    return {name: tuple(int(x) / 1000 for x in line.split())
            for name, line in zip(paths, out.splitlines())}


def pin(pid: int, cpus: set) -> None:
    """Move every thread of a process to the given CPUs."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


def daemon_pid(mnt: str) -> int:
    sys.path.insert(0, os.path.dirname(HERE))
    from khofs import runtime
    return runtime.read_info(os.path.realpath(mnt))["pid"]


def toggles_per_second(path: str, n: int) -> float:
    """echo 1 > finalize; echo 0 > finalize (open O_TRUNC, write, close): pairs per second."""
    t0 = time.perf_counter()
    for _ in range(n):
        for val in (b"1\n", b"0\n"):
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
            os.write(fd, val)
            os.close(fd)
    return n / (time.perf_counter() - t0)


def idle(pid: int, seconds: float = 2.0) -> tuple:
    """(RSS in MiB, CPU ticks used over `seconds`) of an idle process."""
    def ticks():
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    before = ticks()
    time.sleep(seconds)
    used = ticks() - before
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss / 1024, used


def parallel_floors(work: str, count: int = 16) -> float:
    """The same for bench/floor.py: seconds until every one answers a stat of its file."""
    mnts = [os.path.join(work, f"floor{i}") for i in range(count)]
    for m in mnts:
        os.mkdir(m)
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "floor.py"), m, "keep_cache"])
             for m in mnts]
    try:
        for m in mnts:
            wait_mounted(m, 30)
            os.stat(os.path.join(m, "file"))
        return time.perf_counter() - t0
    finally:
        for m in mnts:
            subprocess.call(["fusermount3", "-u", m])
        for p in procs:
            p.wait(10)


def parallel_mounts(work: str, count: int = 16) -> float:
    """`khofs mount` of `count` instances at once: seconds until every one is ready."""
    mnts = [os.path.join(work, f"par{i}") for i in range(count)]
    for m in mnts:
        os.mkdir(m)
    t0 = time.perf_counter()
    procs = [subprocess.Popen([*KHOFS, "mount", m]) for m in mnts]
    ok = all(p.wait() == 0 for p in procs)
    wall = time.perf_counter() - t0
    for m in mnts:
        if mounted(m):
            subprocess.call([*KHOFS, "umount", m])
    if not ok:
        raise RuntimeError("a parallel mount failed")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    args = ap.parse_args()
    n = 500 if args.quick else 3000
    work = tempfile.mkdtemp(prefix="khofs-bench-")
    local = os.path.join(work, "local")
    with open(local, "wb") as f:
        f.write(b"0\n")
    hello, reader = build_hello_ll(work), build_reader(work)
    mnts = {k: os.path.join(work, k) for k in ("hello", "keep_cache", "direct_io", "no_open",
                                               "khofs", "khofs-page")}
    for m in mnts.values():
        os.mkdir(m)
    daemons = [subprocess.Popen([hello, "-f", mnts["hello"]], stderr=subprocess.DEVNULL)]
    for mode in ("keep_cache", "direct_io", "no_open"):
        daemons.append(subprocess.Popen([sys.executable, os.path.join(HERE, "floor.py"),
                                         mnts[mode], mode]))
    cmdline = ["--cmdline", "kho=on reserve_mem=4M:4096:oops"]
    try:
        for m in list(mnts.values())[:4]:
            wait_mounted(m)
        t_mount, t_umount = [], []
        for _ in range(3 if args.quick else 7):
            t0 = time.perf_counter()
            subprocess.check_call([*KHOFS, "mount", mnts["khofs"], *cmdline])
            t_mount.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            subprocess.check_call([*KHOFS, "umount", mnts["khofs"]])
            t_umount.append(time.perf_counter() - t0)
        subprocess.check_call([*KHOFS, "mount", mnts["khofs"], *cmdline])
        subprocess.check_call([*KHOFS, "mount", mnts["khofs-page"], *cmdline, "--cache", "page"])
        files = {"local file": local, "hello_ll (C)": os.path.join(mnts["hello"], "hello")}
        for mode in ("keep_cache", "direct_io", "no_open"):
            files[f"pyfuse3 floor {mode}"] = os.path.join(mnts[mode], "file")
        for m, label in (("khofs", "khofs"), ("khofs-page", "khofs page")):
            out = os.path.join(mnts[m], "kho/out")
            with open(f"{out}/finalize", "w") as f:
                f.write("1\n")
            for name in ("finalize", "fdt", "scratch_phys"):
                files[f"{label} {name}"] = f"{out}/{name}"
        pids = [p.pid for p in daemons] + [daemon_pid(mnts["khofs"]), daemon_pid(mnts["khofs-page"])]
        cpus = sorted(os.sched_getaffinity(0))
        print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
              f"kernel {platform.release()}, Python {platform.python_version()}")
        print(f"\n1. open + read to EOF + close, C reader, {n} each, interleaved (us)")
        for title, where in (("unpinned", set(cpus)), ("reader and daemons on one CPU", {cpus[0]})):
            for pid in pids:
                pin(pid, where)
            lat = read_latency(reader, files, n)
            floor = lat["pyfuse3 floor keep_cache"][0]
            dfloor = lat["pyfuse3 floor direct_io"][0]
            print(f"{title}:")
            print(f"{'file':<28}{'median':>9}{'p90':>9}{'x keep_cache':>14}{'x direct_io':>13}")
            for name, (med, p90) in lat.items():
                print(f"{name:<28}{med:>9.1f}{p90:>9.1f}{med / floor:>14.2f}{med / dfloor:>13.2f}")
        for pid in pids:
            pin(pid, set(cpus))
        print("\n2. echo 1 > finalize; echo 0 > finalize (pairs/s)")
        for m, label in (("khofs", "khofs"), ("khofs-page", "khofs page")):
            fin = os.path.join(mnts[m], "kho/out/finalize")
            with open(fin, "w") as f:
                f.write("0\n")
            print(f"{label:<28}{toggles_per_second(fin, n // 6):>9.0f}")
        print("\n3. mount to ready / umount (ms, median)")
        print(f"{'khofs mount':<28}{statistics.median(t_mount) * 1000:>9.1f}")
        print(f"{'khofs umount':<28}{statistics.median(t_umount) * 1000:>9.1f}")
        rss, ticks = idle(daemon_pid(mnts["khofs"]))
        print("\n4. idle daemon")
        print(f"{'RSS (MiB)':<28}{rss:>9.1f}")
        print(f"{'CPU ticks in 2 s':<28}{ticks:>9d}")
        print("\n5. 16 instances mounted in parallel (s, until all ready)")
        print(f"{'khofs mount x16':<28}{parallel_mounts(work):>9.2f}")
        print(f"{'pyfuse3 floor x16':<28}{parallel_floors(work):>9.2f}")
    finally:
        for m in (mnts["khofs"], mnts["khofs-page"]):
            if mounted(m):
                subprocess.call([*KHOFS, "umount", m])
        for m in list(mnts.values())[:4]:
            subprocess.call(["fusermount3", "-u", m])
        for p in daemons:
            p.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    print("\n6. preserve + finalize + kexec vs preserved size (bench/scale.py)")
    sys.stdout.flush()
    subprocess.call([sys.executable, os.path.join(HERE, "scale.py")])


if __name__ == "__main__":
    main()
