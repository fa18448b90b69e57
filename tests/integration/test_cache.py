"""What the kernel caches stays exact: under both cache modes every write is followed at once,
in the writing process and in another, by what the emulated kernel now shows; removed files
vanish at once; invalidations never deadlock against readers and `ls` of the same
directories; and how many FUSE requests one `cat` costs."""

import errno
import mmap
import multiprocessing as mp
import os
import random
import re
import subprocess
import time

import pytest

from khofs import runtime
from khofs.client import Client, ControlError
from khoit import ISSUE_ARGS, ISSUE_CMDLINE, read, sh, write_bytes

MODES = ["direct", "page"]
CTX = mp.get_context("fork")

# (bytes written, the value kstrtoull(…, 0) reads, or None where it refuses the text).
WRITES = [(b"1", 1), (b"1\n", 1), (b"0x1", 1), (b"+1", 1), (b"01", 1), (b"2", 2), (b"1\0", 1),
          (b"0", 0), (b"00", 0), (b"0x0", 0), (b"+0", 0), (b"0\n", 0),
          (b" 1", None), (b"1 ", None), (b"1\r\n", None), (b"x", None), (b"-1", None),
          (b"0" * 24 + b"1", 0), (b"0" * 23 + b"1", 0), (b"0" * 22 + b"1", 1)]


@pytest.fixture(scope="module", params=MODES)
def cached(module_mounter, request):
    m = module_mounter(*ISSUE_ARGS, "--cache", request.param, cmdline=ISSUE_CMDLINE,
                       name=f"cache-{request.param}")
    yield m
    if read(f"{m.out}/finalize") == b"1\n":
        assert write_bytes(f"{m.out}/finalize", b"0") == 1


def cat(path) -> bytes:
    r = subprocess.run(["cat", path], capture_output=True, timeout=30)
    return r.stdout if r.returncode == 0 else r.stderr


def test_every_write_is_seen_at_once_here_and_from_another_process(cached):
    fin, fdt = f"{cached.out}/finalize", f"{cached.out}/fdt"
    state = 0
    # Read first so the page cache, where there is one, holds the text before each write.
    assert read(fin) == cat(fin) == b"0\n"
    for data, value in WRITES * 2:
        got = write_bytes(fin, data, os.O_WRONLY | os.O_TRUNC)
        if value is None:
            want = "EINVAL"
        elif value and state:
            want = "EEXIST"
        elif not value and not state:
            want = "ENOENT"
        else:
            want, state = len(data), int(bool(value))
        assert got == want, data
        text = b"%d\n" % state
        assert read(fin) == text and cat(fin) == text, data
        assert os.path.exists(fdt) == bool(state), data
        assert (sh(f"test -e {fdt}").returncode == 0) == bool(state), data
    assert ("fdt" in os.listdir(cached.out)) == bool(state)
    if state:
        assert write_bytes(fin, b"0") == 1


def test_a_reader_open_across_a_change_reads_the_new_text(cached):
    fin = f"{cached.out}/finalize"
    assert read(fin) == b"0\n"
    fd = os.open(fin, os.O_RDONLY)
    try:
        assert write_bytes(fin, b"1") == 1
        assert os.read(fd, 100) == b"1\n"
    finally:
        os.close(fd)
    assert write_bytes(fin, b"0") == 1


def test_control_requests_are_seen_at_once(cached):
    fin = f"{cached.out}/finalize"
    c = Client(cached.path)
    assert read(fin) == b"0\n"
    c.subtree_add("cachetest", _tiny_fdt())
    assert write_bytes(fin, b"1") == 1
    assert os.path.exists(f"{cached.out}/sub_fdts/cachetest")
    assert write_bytes(fin, b"0") == 1
    c.subtree_remove("cachetest")
    assert write_bytes(fin, b"1") == 1
    assert not os.path.exists(f"{cached.out}/sub_fdts/cachetest")
    assert "cachetest" not in os.listdir(f"{cached.out}/sub_fdts")
    assert write_bytes(fin, b"0") == 1


def _tiny_fdt():
    import libfdt
    sw = libfdt.FdtSw()
    sw.finish_reservemap()
    sw.begin_node("")
    sw.property_string("compatible", "cache-test-v1")
    sw.end_node()
    b = bytes(sw.as_fdt().as_bytearray())
    return b[:int.from_bytes(b[4:8], "big")]


def test_listxattr_is_empty(cached):
    for p in (cached.path, cached.kho, f"{cached.out}/finalize", f"{cached.out}/scratch_len"):
        assert os.listxattr(p) == []


def test_mmap_only_with_the_page_cache(mount_khofs):
    page = mount_khofs("--cache", "page", name="page")
    direct = mount_khofs(name="direct")
    for m, works in ((page, True), (direct, False)):
        fd = os.open(f"{m.out}/scratch_len", os.O_RDONLY)
        try:
            if works:
                with mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
                    assert mm[:] == read(f"{m.out}/scratch_len")
            else:
                with pytest.raises(OSError) as ei:
                    mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
                assert ei.value.errno == errno.ENODEV
        finally:
            os.close(fd)


# A direct read marks the atime stale (fuse_invalidate_atime), so cat's fstat asks again.
@pytest.mark.parametrize("mode, per_cat", [("direct", ["OPEN", "GETATTR", "READ", "READ", "RELEASE"]),
                                           ("page", ["OPEN", "RELEASE"])])
def test_requests_one_cat_costs(mount_khofs, mode, per_cat):
    m = mount_khofs("--cache", mode, "--debug-fuse")
    fin = f"{m.out}/finalize"
    log = runtime.paths(m.path)["log"]
    for _ in range(2):
        assert cat(fin) == b"0\n"       # entries, attributes and (page) the page now cached

    def ours():
        with open(log) as f:
            return re.findall(r"^khofs: (\w+) nodeid", f.read(), re.M)

    # The kernel sends RELEASE after close(2) returns, so wait until every OPEN has its own.
    def settled():
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            seen = ours()
            if seen.count("OPEN") == seen.count("RELEASE"):
                return seen
            time.sleep(0.01)
        return ours()
    before = len(settled())
    for _ in range(5):
        assert cat(fin) == b"0\n"
    time.sleep(0.1)
    assert settled()[before:] == per_cat * 5


# -- no deadlock: readers and ls against toggles and control requests ----------------------
def _reader(out, mode, stop, errors):
    rnd = random.Random(os.getpid())
    # With the page cache, a read racing `echo 1 >` of the same file may find it empty or
    # cut short: the kernel's FUSE client sets its cached size to 0 at the O_TRUNC open
    # (atomic_o_trunc) and to the written length after the write.
    texts = (b"0\n", b"1\n") + ((b"", b"0", b"1") if mode == "page" else ())
    while not stop.is_set():
        try:
            what = rnd.randrange(4)
            if what == 0:
                assert read(f"{out}/finalize") in texts
            elif what == 1:
                os.listdir(out)
                os.listdir(f"{out}/sub_fdts")
            elif what == 2:
                try:
                    blob = read(f"{out}/fdt")
                    assert blob[:4] == b"\xd0\x0d\xfe\xed"
                except FileNotFoundError:
                    pass
            else:
                r = subprocess.run(["ls", "-la", out, f"{out}/sub_fdts"], capture_output=True,
                                   text=True, timeout=60)
                # A file listed and then removed before ls stats it: as on debugfs.
                odd = [e for e in r.stderr.splitlines() if "No such file or directory" not in e]
                if r.returncode not in (0, 1) or odd:
                    errors.put(f"reader: ls exited {r.returncode}: {r.stderr.strip()}")
        except (FileNotFoundError, OSError) as e:
            # fdt may go between lookup and open (ENOENT) or between open and read (EIO).
            if getattr(e, "errno", None) not in (errno.ENOENT, errno.EIO):
                errors.put(f"reader: {e!r}")
        except Exception as e:
            errors.put(f"reader: {e!r}")


def _toggler(out, rounds, errors, done):
    fin = f"{out}/finalize"
    try:
        for _ in range(rounds):
            for value in (b"1", b"0"):
                got = write_bytes(fin, value, os.O_WRONLY | os.O_TRUNC)
                if got != 1:
                    errors.put(f"toggler: write {value!r} gave {got}")
                state = value == b"1"
                if read(fin) != value + b"\n" or os.path.exists(f"{out}/fdt") != state:
                    errors.put(f"toggler: after {value!r} the tree shows otherwise")
    except Exception as e:
        errors.put(f"toggler: {e!r}")
    finally:
        done.set()


def _controller(mnt, stop, errors):
    c = Client(mnt)
    try:
        while not stop.is_set():
            phys = c.mem_alloc(4096)
            try:
                c.preserve(phys, 4096)
                c.call("unpreserve", phys=phys, size=4096)
            except ControlError as e:
                if e.errno != errno.EBUSY:         # preservations freeze while finalized
                    raise
            c.call("mem_free", phys=phys)
            c.status()
    except Exception as e:
        errors.put(f"control: {e!r}")


def _abort_connection(mnt):
    dev = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mnt:
                dev = int(fields[2].split(":")[1])
    if dev is not None and os.path.exists(f"/sys/fs/fuse/connections/{dev}/abort"):
        with open(f"/sys/fs/fuse/connections/{dev}/abort", "w") as f:
            f.write("1")


@pytest.mark.parametrize("mode", MODES)
def test_invalidations_never_deadlock_against_readers(mount_khofs, mode):
    m = mount_khofs("--cache", mode, cmdline=ISSUE_CMDLINE)
    stop, done, errors = CTX.Event(), CTX.Event(), CTX.Queue()
    procs = [CTX.Process(target=_reader, args=(m.out, mode, stop, errors)) for _ in range(4)]
    procs.append(CTX.Process(target=_controller, args=(m.path, stop, errors)))
    procs.append(CTX.Process(target=_toggler, args=(m.out, 150, errors, done)))
    for p in procs:
        p.start()
    finished = done.wait(120)
    stop.set()
    for p in procs:
        p.join(30)
    stuck = [p for p in procs if p.is_alive()]
    if not finished or stuck:
        _abort_connection(m.path)
        for p in procs:
            p.kill()
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    assert finished and not stuck, "the mount stopped answering (deadlock)"
    assert problems == [], problems[:5]
    assert read(f"{m.out}/finalize") == b"0\n"
