"""Soak: N khofs instances under mixed load for T minutes; prints operations, errors, and
each daemon's RSS and open fds, sampled every 30 s, with the growth after a warm-up.

Usage: python bench/soak.py [--instances 16] [--minutes 10] [--warmup-minutes 2]
                            [--sample 30] [--abi 6.18] [--json]
Each instance gets one load process (this script with --worker) that loops over a mix of
finalize toggles, file reads (cat, ls), control requests (status, memory alloc/write/read/
free, preserve/unpreserve, subtree add/remove, log) and, every 300 operations, a kexec.
Goal: no errors, no fd growth, RSS flat after warm-up (< 1 MiB over the rest of the run).
"""

import argparse
import errno
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
KHOFS = [sys.executable, "-m", "khofs"]
DTS = b'/dts-v1/;\n/ {\n\tcompatible = "soak-v1";\n\tsize = /bits/ 64 <0x2000>;\n};\n'


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def slurp(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def worker(mnt: str, seconds: float, seed: int) -> None:
    """One instance's load; prints {"ops": N, "errors": N, "first_errors": [...]} at the end."""
    from khofs.client import Client
    from khofs.devicetree.dts import dts_to_dtb
    rnd = random.Random(seed)
    out = os.path.join(mnt, "kho", "out")
    fin = os.path.join(out, "finalize")
    blob = dts_to_dtb(DTS)
    ops = errors = 0
    first = []
    end = time.monotonic() + seconds
    c = Client(mnt)

    def toggle():
        if not os.path.exists(fin):
            return
        for v in (b"1", b"0"):
            fd = os.open(fin, os.O_WRONLY | os.O_TRUNC)
            try:
                os.write(fd, v)
            finally:
                os.close(fd)

    def reads():
        for name in ("scratch_phys", "scratch_len"):
            slurp(os.path.join(out, name))
        os.listdir(out)
        os.listdir(os.path.join(out, "sub_fdts"))
        if os.path.exists(os.path.join(mnt, "kho", "in", "fdt")):
            slurp(os.path.join(mnt, "kho", "in", "fdt"))

    def memory():
        phys = c.mem_alloc(8192)
        c.mem_write(phys, os.urandom(64))
        c.mem_read(phys, 64)
        c.preserve(phys, 8192)
        c.unpreserve(phys, 8192)
        c.mem_free(phys)

    def subtree():
        c.subtree_add("soak", blob)
        c.subtree_list()
        c.subtree_remove("soak")

    def control():
        c.status()
        c.log()
        c.memory_layout()

    mix = [toggle] * 3 + [reads] * 4 + [memory] * 2 + [subtree] + [control] * 2
    while time.monotonic() < end:
        op = rnd.choice(mix) if ops % 300 != 299 else (lambda: c.kexec())
        try:
            op()
        except OSError as e:
            if e.errno == errno.ECONNRESET:
                c = Client(mnt)
            errors += 1
            if len(first) < 5:
                first.append(f"{getattr(op, '__name__', 'kexec')}: {e}")
        ops += 1
    c.close()
    print(json.dumps({"ops": ops, "errors": errors, "first_errors": first}), flush=True)


def slope_kib_per_min(samples) -> float:
    """Least-squares slope of (seconds, KiB) samples, per minute."""
    n = len(samples)
    if n < 2:
        return 0.0
    mx = sum(t for t, _ in samples) / n
    my = sum(v for _, v in samples) / n
    den = sum((t - mx) ** 2 for t, _ in samples)
    return 60 * sum((t - mx) * (v - my) for t, v in samples) / den if den else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=16)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--warmup-minutes", type=float,
                    help="not counted in the growth (default: a fifth of the run)")
    ap.add_argument("--sample", type=float, default=30, help="seconds between samples")
    ap.add_argument("--abi", default="6.18")
    ap.add_argument("--json", action="store_true", help="also print every sample as JSON")
    ap.add_argument("--worker", nargs=3, metavar=("MNT", "SECONDS", "SEED"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], float(args.worker[1]), int(args.worker[2]))
        return 0
    seconds = args.minutes * 60
    warmup = (args.warmup_minutes if args.warmup_minutes is not None else args.minutes / 5) * 60
    base = tempfile.mkdtemp(prefix="khofs-soak-")
    mnts, pids, workers = [], [], []
    try:
        for i in range(args.instances):
            mnt = os.path.join(base, f"m{i:02}")
            os.mkdir(mnt)
            subprocess.run(KHOFS + ["mount", mnt, "--abi", args.abi, "--memory", "1G",
                                    "--cmdline", "kho=on reserve_mem=4M:4096:oops"], check=True)
            mnts.append(mnt)
            from khofs import runtime
            pids.append(runtime.read_info(mnt)["pid"])
        t0 = time.monotonic()
        for i, mnt in enumerate(mnts):
            workers.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--worker", mnt, str(seconds), str(i)],
                stdout=subprocess.PIPE, text=True))
        samples = {pid: [] for pid in pids}
        print(f"{args.instances} instances (ABI {args.abi}) x {args.minutes:g} min, sampled "
              f"every {args.sample:g} s, warm-up {warmup / 60:g} min", flush=True)
        while True:
            now = time.monotonic() - t0
            for pid in pids:
                samples[pid].append((now, rss_kib(pid), fds(pid)))
            if args.json:
                print(json.dumps({"t": round(now, 1), "rss_kib": [samples[p][-1][1] for p in pids],
                                  "fds": [samples[p][-1][2] for p in pids]}), flush=True)
            if now >= seconds:
                break
            time.sleep(min(args.sample, seconds - now))
        results = [json.loads(w.communicate()[0]) for w in workers]
        ops = sum(r["ops"] for r in results)
        errs = sum(r["errors"] for r in results)
        print(f"operations: {ops} ({ops / seconds:.0f}/s), errors: {errs}")
        for r in results:
            for e in r["first_errors"]:
                print(f"  error: {e}")
        # growth, the KiB/min fit and fds count from the first sample after the warm-up
        print(f"{'daemon':>8} {'RSS start':>10} {'after wu':>10} {'end':>10} {'growth':>9} "
              f"{'KiB/min':>8} {'fds':>9}")
        for i, pid in enumerate(pids):
            s = samples[pid]
            after = [x for x in s if x[0] >= warmup] or s[-1:]
            grow = s[-1][1] - after[0][1]
            slope = slope_kib_per_min([(t, v) for t, v, _ in after])
            print(f"{pid:>8} {s[0][1]:>7} KiB {after[0][1]:>6} KiB {s[-1][1]:>6} KiB "
                  f"{grow:>+5} KiB {slope:>+8.1f} {after[0][2]:>4}->{s[-1][2]:<4}")
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
        for mnt in mnts:
            subprocess.run(KHOFS + ["umount", mnt], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
