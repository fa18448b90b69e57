"""Concurrency: processes toggling finalize and reading every file while a control client
preserves memory. Invariants are checked at every read; a watchdog bounds the run.

KHOFS_SOAK=1 runs the long version.
"""

import errno
import multiprocessing as mp
import os
import queue
import random
import time

import pytest

import khofs_rel_support as sup
from khofs.client import Client, ControlError

pytestmark = pytest.mark.fuse

SOAK = os.environ.get("KHOFS_SOAK") == "1"
WORKERS = 8
OPS_TARGET = 200_000 if SOAK else 10_000
RACE_ROUNDS = 2_000 if SOAK else 150
WATCHDOG = 1800 if SOAK else 120
MIN_STRICT = 50           # snapshots taken with no write in flight
CMDLINE = "kho=on reserve_mem=1M:4096:relconc"
CTX = mp.get_context("fork")


def _read_chunks(path, chunk=64):
    """The whole file through one fd, in small reads: (bytes, None) or (partial, errno)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        return None, e.errno
    out = b""
    try:
        while True:
            try:
                b = os.read(fd, chunk)
            except OSError as e:
                return out, e.errno
            if not b:
                return out, None
            out += b
    finally:
        os.close(fd)


def toggler(idx, mnt, shared, lock, results, deadline):
    """Toggle finalize and read every file, checking invariants as it goes."""
    rng = random.Random(1000 + idx)
    out = f"{mnt}/kho/out"
    fin = f"{out}/finalize"
    scratch = {n: sup.read_file(f"{out}/{n}") for n in ("scratch_phys", "scratch_len")}
    stats = {"ops": 0, "writes_ok": 0, "eexist": 0, "enoent": 0, "strict_checks": 0,
             "blob_reads": 0, "blob_gone": 0, "sub_reads": 0}
    problems = []

    def bad(msg):
        if len(problems) < 40:
            problems.append(f"worker {idx}: {msg}")

    def op(n=1):
        stats["ops"] += n
        with lock:
            shared["ops"].value += n

    try:
        # Run for the operation count, and until enough quiet snapshots were checked.
        while time.monotonic() < deadline and (shared["ops"].value < OPS_TARGET or
                                               shared["strict"].value < MIN_STRICT):
            action = rng.choices(["toggle", "snapshot", "blob", "scratch", "subs", "finalize"],
                                 [12, 28, 25, 10, 15, 10])[0]
            if action == "toggle":
                value = rng.choice([b"1\n", b"0\n"])
                fd = os.open(fin, os.O_WRONLY)
                with lock:
                    shared["started"].value += 1
                try:
                    n = os.write(fd, value)
                    if n != 2:
                        bad(f"write {value!r} returned {n}")
                    stats["writes_ok"] += 1
                except OSError as e:
                    if (value, e.errno) == (b"1\n", errno.EEXIST):
                        stats["eexist"] += 1
                    elif (value, e.errno) == (b"0\n", errno.ENOENT):
                        stats["enoent"] += 1
                    else:
                        bad(f"write {value!r}: {e}")
                finally:
                    with lock:
                        shared["done"].value += 1
                    os.close(fd)
                op()
            elif action == "snapshot":
                d1 = shared["done"].value
                s1 = shared["started"].value
                f1 = sup.read_file(fin)
                try:
                    os.stat(f"{out}/fdt")
                    exists = True
                except FileNotFoundError:
                    exists = False
                f2 = sup.read_file(fin)
                s2 = shared["started"].value
                op(3)
                for f in (f1, f2):
                    if f not in (b"0\n", b"1\n"):
                        bad(f"finalize reads {f!r}")
                # Only a window in which no write was in flight is a consistent snapshot.
                if f1 == f2 and s1 == d1 == s2:
                    stats["strict_checks"] += 1
                    with lock:
                        shared["strict"].value += 1
                    if exists != (f1 == b"1\n"):
                        bad(f"finalize reads {f1!r} but out/fdt exists={exists}")
            elif action == "blob":
                data, err = _read_chunks(f"{out}/fdt", rng.choice([16, 64, 100]))
                op()
                if err is None:
                    why = sup.fdt_problem(data, "kho-v1")
                    if why:
                        bad(f"out/fdt read through one fd: {why}")
                    stats["blob_reads"] += 1
                elif err in (errno.ENOENT, errno.EIO):
                    stats["blob_gone"] += 1
                else:
                    bad(f"out/fdt read failed with {errno.errorcode.get(err, err)}")
            elif action == "scratch":
                for n, want in scratch.items():
                    got = sup.read_file(f"{out}/{n}")
                    if got != want:
                        bad(f"{n} changed: {got!r} != {want!r}")
                op(2)
            elif action == "subs":
                names = os.listdir(f"{out}/sub_fdts")
                op()
                for n in names:
                    data, err = _read_chunks(f"{out}/sub_fdts/{n}", 128)
                    op()
                    if err is None:
                        why = sup.fdt_problem(data)
                        if why:
                            bad(f"sub_fdts/{n}: {why}")
                        stats["sub_reads"] += 1
                    elif err not in (errno.ENOENT, errno.EIO):
                        bad(f"sub_fdts/{n} read failed with {errno.errorcode.get(err, err)}")
            else:
                f = sup.read_file(fin)
                op()
                if f not in (b"0\n", b"1\n"):
                    bad(f"finalize reads {f!r}")
    except Exception as e:
        bad(f"{type(e).__name__}: {e}")
    results.put(("toggler", idx, stats, problems))


def preserver(mnt, stop, results):
    """A kernel subsystem preserving pages; EBUSY while finalized is the rule."""
    stats = {"ok": 0, "ebusy": 0, "status": 0}
    problems = []
    try:
        with Client(mnt) as c:
            base = c.mem_alloc(64 * 4096)
            k = 0
            while not stop.is_set():
                try:
                    c.preserve(base + 4096 * (k % 64), 4096)
                    stats["ok"] += 1
                except ControlError as e:
                    if e.errno == errno.EBUSY:
                        stats["ebusy"] += 1
                    elif len(problems) < 20:
                        problems.append(f"preserve: {e}")
                k += 1
                if k % 50 == 0:
                    c.status()
                    stats["status"] += 1
    except Exception as e:
        problems.append(f"control client: {type(e).__name__}: {e}")
    results.put(("preserver", 0, stats, problems))


def _collect(procs, results, n, deadline):
    got = []
    while len(got) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            got.append(results.get(timeout=min(left, 1.0)))
        except queue.Empty:
            if not any(p.is_alive() for p in procs) and results.empty():
                break
    return got


def _reap(procs):
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)


def test_toggle_and_read_under_preservation(mounter):
    mnt = mounter.mount("--cmdline", CMDLINE, "--memory", "1G")
    with Client(mnt) as c:
        c.subtree_add("relconc", sup.small_dtb("rel-conc-v1"))
    shared = {k: CTX.RawValue("q", 0) for k in ("ops", "started", "done", "strict")}
    lock = CTX.Lock()
    results = CTX.Queue()
    stop = CTX.Event()
    t0 = time.monotonic()
    deadline = t0 + WATCHDOG
    procs = [CTX.Process(target=toggler, args=(i, mnt, shared, lock, results, deadline))
             for i in range(WORKERS)]
    pres = CTX.Process(target=preserver, args=(mnt, stop, results))
    for p in procs + [pres]:
        p.start()
    try:
        got = _collect(procs, results, WORKERS, deadline + 5)
        stop.set()
        got += _collect([pres], results, 1, time.monotonic() + 30)
    finally:
        stop.set()
        _reap(procs + [pres])
    elapsed = time.monotonic() - t0
    assert len(got) == WORKERS + 1, f"watchdog: only {len(got)} of {WORKERS + 1} processes " \
                                    f"reported within {WATCHDOG}s"
    problems = [p for *_, ps in got for p in ps]
    tot = {}
    for kind, _, stats, _ in got:
        for k, v in stats.items():
            tot[f"{kind}.{k}"] = tot.get(f"{kind}.{k}", 0) + v
    print(f"\nconcurrency: {tot.get('toggler.ops', 0)} ops in {elapsed:.1f}s by {WORKERS} processes "
          f"+ a control client; {len(problems)} problems; {tot}")
    sup.report_family("concurrent file operations", tot.get("toggler.ops", 0), problems)
    assert not problems, "\n".join(problems[:40])
    assert tot["toggler.ops"] >= OPS_TARGET, tot
    # The invariants were really exercised: both states, both outcomes of a preserve.
    assert tot["toggler.strict_checks"] >= MIN_STRICT, tot
    assert tot["toggler.writes_ok"] > 0 and tot["toggler.eexist"] > 0 and tot["toggler.enoent"] > 0
    assert tot["toggler.blob_reads"] > 0 and tot["toggler.sub_reads"] > 0, tot
    assert tot["preserver.ok"] > 0 and tot["preserver.ebusy"] > 0, tot
    # Quiet again: the tree matches the state.
    f = sup.read_file(f"{mnt}/kho/out/finalize")
    assert os.path.exists(f"{mnt}/kho/out/fdt") == (f == b"1\n")
    with Client(mnt) as c:
        assert c.status()["finalized"] == (f == b"1\n")


def racer(idx, fin, barrier, go, results, rounds):
    for r in range(rounds):
        if not go.get():
            break
        fd = os.open(fin, os.O_WRONLY)
        try:
            barrier.wait(30)
            try:
                res = os.write(fd, b"1\n")
            except OSError as e:
                res = -e.errno
        finally:
            os.close(fd)
        results.put((r, idx, res))


def test_racing_finalize_exactly_one_wins(mounter):
    mnt = mounter.mount("--cmdline", CMDLINE, "--memory", "1G")
    fin = f"{mnt}/kho/out/finalize"
    barrier = CTX.Barrier(2)
    results = CTX.Queue()
    gos = [CTX.Queue(), CTX.Queue()]
    procs = [CTX.Process(target=racer, args=(i, fin, barrier, gos[i], results, RACE_ROUNDS))
             for i in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + WATCHDOG
    failures = []
    try:
        for r in range(RACE_ROUNDS):
            if sup.read_file(fin) == b"1\n":
                sup.write_file(fin, b"0\n")
            assert sup.read_file(fin) == b"0\n"
            for g in gos:
                g.put(True)
            outcome = {}
            while len(outcome) < 2:
                left = deadline - time.monotonic()
                assert left > 0, f"watchdog: round {r} did not finish"
                rr, idx, res = results.get(timeout=min(left, 30))
                assert rr == r
                outcome[idx] = res
            if sorted(outcome.values()) != sorted([2, -errno.EEXIST]):
                failures.append(f"round {r}: results {outcome}")
            if sup.read_file(fin) != b"1\n" or not os.path.exists(f"{mnt}/kho/out/fdt"):
                failures.append(f"round {r}: not finalized after the race")
    finally:
        for g in gos:
            g.put(False)
        _reap(procs)
    sup.report_family("racing echo 1 rounds", RACE_ROUNDS, failures)
    assert not failures, "\n".join(failures[:20])
