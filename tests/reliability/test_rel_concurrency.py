"""Concurrency, per ABI profile: processes toggling finalize and reading every file while a
control client preserves memory (6.16, 6.18, 7.0), racing writers of 1; in 7.0 and 7.1, where
the root FDT is edited in place, producers adding and removing subtrees while readers read
out/fdt and out/sub_fdts, and racing adds of one name. Invariants are checked at every read;
a watchdog bounds the run.

KHOFS_SOAK=1 runs the long version.
"""

import contextlib
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


def toggler(idx, mnt, shared, lock, results, deadline, ref=None):
    """Toggle finalize and read every file, checking invariants as it goes.

    ref: None for 6.16/6.18; for 7.0 (out/fdt bytes at the start, offset of the map address in
    them): there a write of 1 re-serializes and succeeds, 0 is EINVAL, finalize never goes back
    to 0, out/fdt is there throughout and only its map address changes."""
    rng = random.Random(1000 + idx)
    out = f"{mnt}/kho/out"
    fin = f"{out}/finalize"
    scratch = {n: sup.read_file(f"{out}/{n}") for n in ("scratch_phys", "scratch_len")}
    stats = {"ops": 0, "writes_ok": 0, "eexist": 0, "enoent": 0, "einval": 0, "strict_checks": 0,
             "blob_reads": 0, "blob_gone": 0, "sub_reads": 0}
    problems = []
    seen_one = [False]

    def bad(msg):
        if len(problems) < 40:
            problems.append(f"worker {idx}: {msg}")

    def check_fin(f):
        if f not in (b"0\n", b"1\n"):
            bad(f"finalize reads {f!r}")
        elif ref is not None:
            if f == b"0\n" and seen_one[0]:
                bad("finalize went back to 0")
            seen_one[0] |= f == b"1\n"

    def check_70_fdt(data):
        # Only the 8 bytes of the map address may differ from the start (a read in chunks
        # may mix two of them, as on the kernel).
        blob, at = ref
        if len(data) != len(blob) or data[:at] + data[at + 8:] != blob[:at] + blob[at + 8:]:
            bad(f"out/fdt ({len(data)} bytes) changed beyond its map address")

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
                    if ref is not None and value == b"0\n":
                        bad("write 0 succeeded (7.0: EINVAL)")
                    stats["writes_ok"] += 1
                except OSError as e:
                    if ref is not None:
                        if (value, e.errno) == (b"0\n", errno.EINVAL):
                            stats["einval"] += 1
                        else:
                            bad(f"write {value!r}: {e}")
                    elif (value, e.errno) == (b"1\n", errno.EEXIST):
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
                blob = sup.read_file(f"{out}/fdt") if ref is not None else None
                f2 = sup.read_file(fin)
                s2 = shared["started"].value
                op(3)
                for f in (f1, f2):
                    check_fin(f)
                if ref is not None:
                    check_70_fdt(blob)
                    if not exists:
                        bad("out/fdt is gone (7.0: there from boot)")
                # Only a window in which no write was in flight is a consistent snapshot.
                if f1 == f2 and s1 == d1 == s2:
                    stats["strict_checks"] += 1
                    with lock:
                        shared["strict"].value += 1
                    if ref is not None:
                        # The map address is 0 until the first write of 1 serialized it.
                        at = ref[1]
                        if (blob[at:at + 8] != bytes(8)) != (f1 == b"1\n"):
                            bad(f"finalize reads {f1!r} but the map address is "
                                f"{blob[at:at + 8].hex()}")
                    elif exists != (f1 == b"1\n"):
                        bad(f"finalize reads {f1!r} but out/fdt exists={exists}")
            elif action == "blob":
                data, err = _read_chunks(f"{out}/fdt", rng.choice([16, 64, 100]))
                op()
                if err is None:
                    if ref is not None:
                        check_70_fdt(data)
                    else:
                        why = sup.fdt_problem(data, "kho-v1")
                        if why:
                            bad(f"out/fdt read through one fd: {why}")
                    stats["blob_reads"] += 1
                elif err in (errno.ENOENT, errno.EIO) and ref is None:
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
                    elif err not in (errno.ENOENT, errno.EIO) or ref is not None:
                        bad(f"sub_fdts/{n} read failed with {errno.errorcode.get(err, err)}")
            else:
                f = sup.read_file(fin)
                op()
                check_fin(f)
    except Exception as e:
        bad(f"{type(e).__name__}: {e}")
    results.put(("toggler", idx, stats, problems))


def preserver(mnt, stop, results, pause=0.0):
    """A kernel subsystem preserving pages; EBUSY while finalized is the rule (6.16, 6.18)."""
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
                if pause:
                    time.sleep(pause)
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


def _run(workers, others, results, stop, deadline):
    """Start every process; collect the workers' reports, then stop the others and collect
    theirs. Returns (totals as {"kind.stat": sum}, every problem reported)."""
    for p in workers + others:
        p.start()
    try:
        got = _collect(workers, results, len(workers), deadline + 5)
        stop.set()
        got += _collect(others, results, len(others), time.monotonic() + 30)
    finally:
        stop.set()
        _reap(workers + others)
    n = len(workers) + len(others)
    assert len(got) == n, f"watchdog: only {len(got)} of {n} processes reported within {WATCHDOG}s"
    tot = {}
    for kind, _, stats, _ in got:
        for k, v in stats.items():
            tot[f"{kind}.{k}"] = tot.get(f"{kind}.{k}", 0) + v
    return tot, [p for *_, ps in got for p in ps]


def _reap(procs):
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)


@pytest.mark.parametrize("abi", sup.FINALIZE_PROFILES)
def test_toggle_and_read_under_preservation(mounter, abi):
    mnt = mounter.mount("--cmdline", CMDLINE, "--memory", "1G", "--abi", abi)
    with Client(mnt) as c:
        c.subtree_add("relconc", sup.small_dtb("rel-conc-v1"))
        root = sup.live_root_fdt(c)
    ref = None
    if abi == "7.0":
        blob = sup.read_file(f"{mnt}/kho/out/fdt")
        ref = (blob, sup.root_props(root)["preserved-memory-map"][0])
        assert blob == root[:len(blob)] and ref[1] + 8 <= len(blob)
    shared = {k: CTX.RawValue("q", 0) for k in ("ops", "started", "done", "strict")}
    lock = CTX.Lock()
    results = CTX.Queue()
    stop = CTX.Event()
    t0 = time.monotonic()
    deadline = t0 + WATCHDOG
    procs = [CTX.Process(target=toggler, args=(i, mnt, shared, lock, results, deadline, ref))
             for i in range(WORKERS)]
    pres = CTX.Process(target=preserver, args=(mnt, stop, results))
    tot, problems = _run(procs, [pres], results, stop, deadline)
    elapsed = time.monotonic() - t0
    print(f"\nconcurrency [{abi}]: {tot.get('toggler.ops', 0)} ops in {elapsed:.1f}s by {WORKERS} "
          f"processes + a control client; {len(problems)} problems; {tot}")
    sup.report_family(f"concurrent file operations [{abi}]", tot.get("toggler.ops", 0), problems)
    assert not problems, "\n".join(problems[:40])
    assert tot["toggler.ops"] >= OPS_TARGET, tot
    # The invariants were really exercised: both states, both outcomes of a preserve.
    assert tot["toggler.strict_checks"] >= MIN_STRICT, tot
    if ref is None:
        assert tot["toggler.writes_ok"] > 0 and tot["toggler.eexist"] > 0 \
            and tot["toggler.enoent"] > 0
        assert tot["toggler.blob_reads"] > 0 and tot["toggler.sub_reads"] > 0, tot
        assert tot["preserver.ok"] > 0 and tot["preserver.ebusy"] > 0, tot
        # Quiet again: the tree matches the state.
        f = sup.read_file(f"{mnt}/kho/out/finalize")
        assert os.path.exists(f"{mnt}/kho/out/fdt") == (f == b"1\n")
        with Client(mnt) as c:
            assert c.status()["finalized"] == (f == b"1\n")
        return
    # 7.0: both outcomes of a write; preservations are never refused once finalized.
    assert tot["toggler.writes_ok"] > 0 and tot["toggler.einval"] > 0, tot
    assert tot["toggler.eexist"] == tot["toggler.enoent"] == tot["toggler.blob_gone"] == 0, tot
    assert tot["toggler.blob_reads"] > 0 and tot["toggler.sub_reads"] > 0, tot
    assert tot["preserver.ok"] > 0 and tot["preserver.ebusy"] == 0, tot
    assert sup.read_file(f"{mnt}/kho/out/finalize") == b"1\n"
    with Client(mnt) as c:
        assert c.status()["finalized"] is True
        root = sup.live_root_fdt(c)
    assert sup.fdt_problem(root, "kho-v1") is None
    assert sup.root_prop(root, "preserved-memory-map") != bytes(8)
    assert sup.read_file(f"{mnt}/kho/out/fdt") == root[:len(ref[0])]


def racer(idx, barrier, go, results, fin, rounds):
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


@pytest.mark.parametrize("abi", sup.FINALIZE_PROFILES)
def test_racing_finalize_exactly_one_wins(mounter, abi):
    # 7.0: room for a fresh 128 MiB order-0 bitmap in every round.
    memory = f"{(RACE_ROUNDS + 16) * 128}M" if abi == "7.0" else "1G"
    mnt = mounter.mount("--cmdline", CMDLINE, "--memory", memory, "--abi", abi)
    fin = f"{mnt}/kho/out/finalize"
    failures = []
    with _two_racers(racer, fin, RACE_ROUNDS) as race, \
            (Client(mnt) if abi == "7.0" else contextlib.nullcontext()) as c:
        for r in range(RACE_ROUNDS):
            if c is not None:
                page = _preserve_in_a_new_bitmap(c, r)
            elif sup.read_file(fin) == b"1\n":
                sup.write_file(fin, b"0\n")
            if c is None:
                assert sup.read_file(fin) == b"0\n"
            outcome = race(r)
            # 7.0: every write of 1 re-serializes and succeeds.
            want = [2, 2] if c is not None else [2, -errno.EEXIST]
            if sorted(outcome.values()) != sorted(want):
                failures.append(f"round {r}: results {outcome}")
            if sup.read_file(fin) != b"1\n" or not os.path.exists(f"{mnt}/kho/out/fdt"):
                failures.append(f"round {r}: not finalized after the race")
            if c is not None and not _map_marks(c, page):
                failures.append(f"round {r}: the page preserved before the race is not in "
                                "the map the writes serialized")
    sup.report_family(f"racing echo 1 rounds [{abi}]", RACE_ROUNDS, failures)
    assert not failures, "\n".join(failures[:20])


@contextlib.contextmanager
def _two_racers(target, *extra):
    """Two processes running target(idx, barrier, go, results, *extra); yields race(r), which
    lets both go once and returns {racer: its result} of round r. Reaped on the way out."""
    barrier = CTX.Barrier(2)
    results = CTX.Queue()
    gos = [CTX.Queue(), CTX.Queue()]
    procs = [CTX.Process(target=target, args=(i, barrier, gos[i], results, *extra))
             for i in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + WATCHDOG

    def race(r):
        for g in gos:
            g.put(True)
        outcome = {}
        while len(outcome) < 2:
            left = deadline - time.monotonic()
            assert left > 0, f"watchdog: round {r} did not finish"
            rr, idx, res = results.get(timeout=min(left, 30))
            assert rr == r
            outcome[idx] = res
        return outcome

    try:
        yield race
    finally:
        for g in gos:
            g.put(False)
        _reap(procs)


def _map_marks(c, phys):
    first = int.from_bytes(sup.root_prop(sup.live_root_fdt(c), "preserved-memory-map"), "little")
    return sup.chunk_map_marks(c.mem_read, first, phys)


def _preserve_in_a_new_bitmap(c, r):
    """7.0: preserve a page whose order-0 bitmap does not exist yet. The serialized chunks point
    at live bitmaps, so only a new bitmap shows whether a later write of 1 serialized again."""
    page = (r + 8) << 27
    c.preserve(page, sup.PAGE)
    assert not _map_marks(c, page), f"round {r}: {page:#x} is in the map before any write of 1"
    return page


# -- 7.0 / 7.1: subtrees come and go while the root FDT is edited in place --------------------
SUBTREE_PROFILES = ["7.0", "7.1", "7.4"]
SUB_PROP = {"7.0": "fdt", "7.1": "preserved-data", "7.4": "preserved-data"}
# out/fdt's size is fixed at kho_init: the root FDT with no child (7.0), or with only
# kexec-metadata (7.1) (KHO-SPEC §9, §10).
OUT_FDT_SIZE = {"7.0": 152, "7.1": 233, "7.4": 233}      # kho-v4 is as long as kho-v3
CHURNERS = 2
CHURN_NAMES = 3           # per churner
READERS = 4
CHURN_OPS = 40_000 if SOAK else 4_000


def churn_blob(abi, name, gen):
    """A blob that says which subtree and generation it is: an FDT before kho-v3, raw bytes
    of varying size in 7.1 (blob-size carries the size)."""
    if abi == "7.0":
        return sup.small_dtb(f"churn-{name}", {"gen": gen})
    head = b"churn %s gen %d size " % (name.encode(), gen)
    size = 40 + (gen * 97) % 700
    return (head + b"%d;" % size).ljust(size, b".")


def churn_blob_problem(abi, name, data):
    """None if data is one of churn_blob's blobs for name, else what is wrong."""
    if abi == "7.0":
        return sup.fdt_problem(data, f"churn-{name}")
    head = b"churn %s gen " % name.encode()
    try:
        gen = int(data[len(head):].split(b" ")[0])
    except ValueError:
        gen = -1
    return None if data == churn_blob(abi, name, gen) else f"{len(data)} bytes not of {name!r}"


def churner(idx, mnt, abi, shared, lock, flags, results, stop):
    """A producer adding and removing its subtrees; each change is bracketed by the counters
    so that readers know when no change was in flight."""
    rng = random.Random(2000 + idx)
    names = [f"churn-{idx}-{k}" for k in range(CHURN_NAMES)]
    gens = {}
    stats = {"added": 0, "removed": 0}
    problems = []
    try:
        with Client(mnt) as c:
            while not stop.is_set():
                k = rng.randrange(CHURN_NAMES)
                name = names[k]
                with lock:
                    shared["started"].value += 1
                try:
                    if flags[idx * CHURN_NAMES + k]:
                        c.subtree_remove(name)
                        flags[idx * CHURN_NAMES + k] = 0
                        stats["removed"] += 1
                    else:
                        gen = gens[name] = gens.get(name, 0) + 1
                        c.subtree_add(name, churn_blob(abi, name, gen))
                        flags[idx * CHURN_NAMES + k] = gen
                        stats["added"] += 1
                except ControlError as e:
                    if len(problems) < 20:
                        problems.append(f"churner {idx}: {name}: {e}")
                finally:
                    with lock:
                        shared["done"].value += 1
                if rng.random() < 0.25:
                    time.sleep(rng.uniform(0.01, 0.03))    # quiet windows for the readers
    except Exception as e:
        problems.append(f"churner {idx}: {type(e).__name__}: {e}")
    results.put(("churner", idx, stats, problems))


def churn_reader(idx, mnt, abi, base, shared, flags, results, deadline):
    """Read out/fdt and out/sub_fdts while subtrees change; compare with the live root FDT
    whenever no change was in flight."""
    rng = random.Random(3000 + idx)
    out = f"{mnt}/kho/out"
    size = OUT_FDT_SIZE[abi]
    stats = {"ops": 0, "strict_checks": 0, "fdt_reads": 0, "sub_reads": 0, "sub_gone": 0}
    problems = []

    def bad(msg):
        if len(problems) < 40:
            problems.append(f"reader {idx}: {msg}")

    def registered():
        return {f"churn-{i // CHURN_NAMES}-{i % CHURN_NAMES}": g for i, g in enumerate(flags) if g}

    def read_sub(name):
        data, err = _read_chunks(f"{out}/sub_fdts/{name}", rng.choice([32, 128]))
        if err is not None:
            if name in base or err not in (errno.ENOENT, errno.EIO):
                bad(f"sub_fdts/{name} read failed with {errno.errorcode.get(err, err)}")
            stats["sub_gone"] += 1
            return
        stats["sub_reads"] += 1
        if name in base:
            if data != base[name]:
                bad(f"sub_fdts/{name} changed")
        elif not name.startswith("churn-"):
            bad(f"sub_fdts/{name} was never added")
        else:
            why = churn_blob_problem(abi, name, data)
            if why:
                bad(f"sub_fdts/{name}: {why}")

    try:
        with Client(mnt) as c:
            while time.monotonic() < deadline and (shared["ops"].value < CHURN_OPS or
                                                   shared["strict"].value < MIN_STRICT):
                action = rng.choices(["snapshot", "fdt", "subs"], [40, 30, 30])[0]
                if action == "fdt":
                    # Chunks may mix two versions (the kernel does not lock the blob either):
                    # only the length is certain.
                    data, err = _read_chunks(f"{out}/fdt", rng.choice([16, 64, 100]))
                    stats["fdt_reads"] += 1
                    if err is not None or len(data) != size:
                        bad(f"out/fdt read: {len(data or b'')} bytes, error {err}")
                elif action == "subs":
                    names = os.listdir(f"{out}/sub_fdts")
                    for n in base:
                        if n not in names:
                            bad(f"sub_fdts/{n} is missing")
                    for n in names:
                        read_sub(n)
                else:
                    s1, d1 = shared["started"].value, shared["done"].value
                    want = registered()
                    shown = sup.read_file(f"{out}/fdt")
                    listing = _sizes(f"{out}/sub_fdts")
                    root = sup.live_root_fdt(c)
                    s2 = shared["started"].value
                    if len(shown) != size:
                        bad(f"out/fdt reads {len(shown)} bytes, not {size}")
                    if s1 == d1 == s2:
                        stats["strict_checks"] += 1
                        with shared["lock"]:
                            shared["strict"].value += 1
                        for p in _root_problems(abi, root, shown, listing, set(base) | set(want)):
                            bad(p)
                with shared["lock"]:
                    shared["ops"].value += 1
                stats["ops"] += 1
    except Exception as e:
        bad(f"{type(e).__name__}: {e}")
    results.put(("reader", idx, stats, problems))


def _sizes(d):
    """{name: st_size} of a directory's files; one removed between listing and stat is left out
    (only a window with no change in flight is judged)."""
    out = {}
    for n in os.listdir(d):
        try:
            out[n] = os.stat(f"{d}/{n}").st_size
        except FileNotFoundError:
            pass
    return out


def _root_problems(abi, root, shown, listing, names):
    """What is wrong with a quiet tree: out/fdt the first bytes of a valid root FDT whose
    children are exactly the sub_fdts files (with blob-size = file size in 7.1)."""
    why = sup.fdt_problem(root, sup.COMPATIBLE[abi])
    if why:
        return [f"root FDT: {why}"]
    problems = []
    if shown != root[:len(shown)]:
        problems.append("out/fdt is not the first bytes of the root FDT")
    if set(listing) != names:
        problems.append(f"sub_fdts lists {sorted(listing)}, registered {sorted(names)}")
    children = sup.subnodes(root)
    if set(children) != set(listing):
        problems.append(f"root children {sorted(children)} != sub_fdts {sorted(listing)}")
    for n, props in children.items():
        if len(props.get(SUB_PROP[abi], b"")) != 8:
            problems.append(f"child {n}: {SUB_PROP[abi]} is {props.get(SUB_PROP[abi])!r}")
        if abi in sup.RADIX_PROFILES and n in listing and \
                props.get("blob-size") != listing[n].to_bytes(8, "little"):
            problems.append(f"child {n}: blob-size {props.get('blob-size')!r}, file {listing[n]}")
    return problems


@pytest.mark.parametrize("abi", SUBTREE_PROFILES)
def test_subtree_churn_against_readers(mounter, abi):
    mnt = mounter.mount("--cmdline", CMDLINE, "--memory", "1G", "--abi", abi)
    out = f"{mnt}/kho/out"
    base = {n: sup.read_file(f"{out}/sub_fdts/{n}") for n in os.listdir(f"{out}/sub_fdts")}
    assert set(base) == ({"memblock", "kexec-metadata"} if abi in sup.RADIX_PROFILES
                         else {"memblock"})
    assert len(sup.read_file(f"{out}/fdt")) == OUT_FDT_SIZE[abi]
    lock = CTX.Lock()
    shared = {k: CTX.RawValue("q", 0) for k in ("ops", "started", "done", "strict")}
    shared["lock"] = lock
    flags = CTX.RawArray("q", CHURNERS * CHURN_NAMES)
    results = CTX.Queue()
    stop = CTX.Event()
    t0 = time.monotonic()
    deadline = t0 + WATCHDOG
    readers = [CTX.Process(target=churn_reader, args=(i, mnt, abi, base, shared, flags, results,
                                                      deadline)) for i in range(READERS)]
    others = [CTX.Process(target=churner, args=(i, mnt, abi, shared, lock, flags, results, stop))
              for i in range(CHURNERS)]
    others.append(CTX.Process(target=preserver, args=(mnt, stop, results, 0.002)))
    tot, problems = _run(readers, others, results, stop, deadline)
    elapsed = time.monotonic() - t0
    print(f"\nsubtree churn [{abi}]: {tot.get('reader.ops', 0)} reads in {elapsed:.1f}s; "
          f"{len(problems)} problems; {tot}")
    sup.report_family(f"subtree churn against readers [{abi}]", tot.get("reader.ops", 0), problems)
    assert not problems, "\n".join(problems[:40])
    assert tot["reader.ops"] >= CHURN_OPS and tot["reader.strict_checks"] >= MIN_STRICT, tot
    assert tot["churner.added"] > 0 and tot["churner.removed"] > 0, tot
    assert tot["reader.sub_reads"] > 0 and tot["reader.fdt_reads"] > 0, tot
    # No finalize to refuse them: every preservation is taken.
    assert tot["preserver.ok"] > 0 and tot["preserver.ebusy"] == 0, tot
    # Quiet: the tree is exactly what the producers left registered, blob for blob.
    names = {f"churn-{i // CHURN_NAMES}-{i % CHURN_NAMES}": g for i, g in enumerate(flags) if g}
    listing = _sizes(f"{out}/sub_fdts")
    with Client(mnt) as c:
        root = sup.live_root_fdt(c)
    assert _root_problems(abi, root, sup.read_file(f"{out}/fdt"), listing,
                          set(base) | set(names)) == []
    for n, gen in names.items():
        assert sup.read_file(f"{out}/sub_fdts/{n}") == churn_blob(abi, n, gen)


def subtree_racer(idx, barrier, go, results, mnt, abi, rounds):
    """Add subtree "race" with a blob of its own, at the barrier, once per round."""
    with Client(mnt) as c:
        for r in range(rounds):
            if not go.get():
                break
            blob = churn_blob(abi, "race", 2 * r + idx)
            barrier.wait(30)
            try:
                res = c.subtree_add("race", blob)
            except ControlError as e:
                res = -e.errno
            results.put((r, idx, res))


@pytest.mark.parametrize("abi", SUBTREE_PROFILES)
def test_racing_subtree_add_exactly_one_wins(mounter, abi):
    """kho_add_subtree runs under kho_out.lock; fdt_add_subnode of a name already there fails
    with -FDT_ERR_EXISTS, which the kernel returns as -EEXIST."""
    mnt = mounter.mount("--cmdline", CMDLINE, "--memory", "1G", "--abi", abi)
    out = f"{mnt}/kho/out"
    failures = []
    with _two_racers(subtree_racer, mnt, abi, RACE_ROUNDS) as race, Client(mnt) as c:
        for r in range(RACE_ROUNDS):
            assert not os.path.exists(f"{out}/sub_fdts/race")
            outcome = race(r)
            winners = [i for i, res in outcome.items() if res >= 0]
            if len(winners) != 1 or -errno.EEXIST not in outcome.values():
                failures.append(f"round {r}: results {outcome}")
            else:
                w = winners[0]
                blob = churn_blob(abi, "race", 2 * r + w)
                child = sup.subnodes(sup.live_root_fdt(c)).get("race", {})
                if sup.read_file(f"{out}/sub_fdts/race") != blob:
                    failures.append(f"round {r}: sub_fdts/race is not the winner's blob")
                if child.get(SUB_PROP[abi]) != outcome[w].to_bytes(8, "little"):
                    failures.append(f"round {r}: the root FDT's race child is {child}")
            c.subtree_remove("race")
            if "race" in sup.subnodes(sup.live_root_fdt(c)):
                failures.append(f"round {r}: the race child outlived its removal")
    sup.report_family(f"racing subtree_add rounds [{abi}]", RACE_ROUNDS, failures)
    assert not failures, "\n".join(failures[:20])
