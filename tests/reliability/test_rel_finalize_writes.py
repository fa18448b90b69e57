"""Bad input, family (a): writes to kho/out/finalize through a real mount, per ABI profile.

Every write is judged against an oracle written from KHO-SPEC §2 (simple_attr_write +
kstrtoull) and the profile's rule (§9: 7.0 re-serializes on any nonzero value and refuses 0),
and the tree is checked afterwards for the state the kernel would leave. 7.1 has no finalize:
there the writes go to the files its tree does have.
"""

import contextlib
import errno
import os

import pytest
from hypothesis import strategies as st

import khofs_rel_support as sup
from khofs.client import Client

pytestmark = pytest.mark.fuse

CMDLINE = "kho=on reserve_mem=1M:4096:relfin"
SUBTREE = "memblock"
# 7.0 fixes out/fdt's size at kho_init, before memblock registers: the root FDT of no subtree.
OUT_FDT_70 = 152

# Kinds of payloads: mostly near-misses of a number, some binary noise, long buffers whose
# meaningful part is cut at 23 bytes, and the u64 boundary in every base.
_SIGNS = ["", "", "", "+", "-", " ", "++", "+-", "\t"]
_PREFIXES = ["", "", "", "0", "0x", "0X", "00", "x", "0b", "0o"]
_SUFFIXES = ["", "", "", "\n", "\n\n", "\r\n", " ", "\t", "\0", "\0junk", "\n\0", "x", "k",
             "\n1", "\r", "\x7f"]


@st.composite
def number_like(draw):
    digits = draw(st.text(alphabet="0123456789abcdefABCDEFgxz", min_size=0, max_size=26))
    s = draw(st.sampled_from(_SIGNS)) + draw(st.sampled_from(_PREFIXES)) + digits + \
        draw(st.sampled_from(_SUFFIXES))
    return s.encode()


@st.composite
def boundary(draw):
    v = draw(st.sampled_from([0, 1, 2, (1 << 64) - 1, 1 << 64, (1 << 64) + 1, 1 << 63,
                              10 ** 20, (1 << 64) * 8]))
    fmt = draw(st.sampled_from(["d", "o", "x", "X"]))
    body = format(v, fmt)
    prefix = {"d": "", "o": "0", "x": "0x", "X": "0X"}[fmt]
    width = draw(st.integers(0, 26))
    text = prefix + body.rjust(max(width - len(prefix), len(body)), "0")
    return (text + draw(st.sampled_from(["", "\n", "\0", "x"]))).encode()


@st.composite
def long_buffer(draw):
    head = draw(st.one_of(number_like(), boundary(), st.binary(min_size=0, max_size=30)))
    length = draw(st.integers(24, 4096))
    fill = draw(st.sampled_from([b"0", b"1", b"\n", b"\0", b" ", b"\xff", b"9"]))
    return (head + fill * length)[:length]


payload = st.one_of(number_like(), number_like(), number_like(), boundary(),
                    st.binary(min_size=1, max_size=64), long_buffer(),
                    st.text(min_size=1, max_size=30).map(lambda s: s.encode())) \
    .map(lambda b: b or b"\0")

# One open, then one to three writes on it: the kernel parses each write on its own.
example = st.tuples(st.booleans(),
                    st.sampled_from(["wronly", "rdwr", "trunc", "append"]),
                    st.lists(payload, min_size=1, max_size=3).map(tuple))

OPEN_FLAGS = {"wronly": os.O_WRONLY, "rdwr": os.O_RDWR, "trunc": os.O_WRONLY | os.O_TRUNC,
              "append": os.O_WRONLY | os.O_APPEND}


def _write(fd, data):
    try:
        return os.write(fd, data)
    except OSError as e:
        return -e.errno


def _name(r):
    return r if r >= 0 else errno.errorcode.get(-r, str(-r))


@pytest.mark.parametrize("abi", sup.FINALIZE_PROFILES)
def test_finalize_writes(mounter, abi):
    mnt = mounter.mount("--cmdline", CMDLINE, "--memory", "1G", "--abi", abi)
    corpus = sup.load_corpus("finalize_writes.txt")
    cases = [(state, "wronly", (data,)) for data in corpus for state in (False, True)]
    seen = {repr(c) for c in cases}
    for c in sup.collect_examples(example, 700, seed=0x6B686F31):
        if repr(c) not in seen:
            seen.add(repr(c))
            cases.append(c)
    # 7.0: out/fdt is a window onto the live root FDT, whose map address each write of 1 renews.
    with (Client(mnt) if abi == "7.0" else contextlib.nullcontext()) as client:
        failures = _finalize_cases(mnt, abi, cases, client)
    sup.check_family(f"finalize writes [{abi}]", len(cases), failures)


def _finalize_cases(mnt, abi, cases, client):
    out = f"{mnt}/kho/out"
    fin = f"{out}/finalize"
    root = sup.live_root_fdt(client) if client else None
    state = False
    failures = []

    def set_state(want):
        fd = os.open(fin, os.O_WRONLY)
        try:
            assert os.write(fd, b"1\n" if want else b"0\n") == 2
        finally:
            os.close(fd)

    for state0, mode, writes in cases:
        if state != state0 and not (abi == "7.0" and state):     # 7.0 never goes back to 0
            set_state(state0)
            state = state0
            root = sup.live_root_fdt(client) if client else None
        state0 = state
        problems = []
        refreshes = 0
        fd = os.open(fin, OPEN_FLAGS[mode])
        try:
            for i, data in enumerate(writes):
                want, after = sup.finalize_write_oracle(data, state, abi)
                got = _write(fd, data)
                if got != want:
                    problems.append(f"write #{i} of {data[:40]!r} (len {len(data)}) in state "
                                    f"{int(state)}: got {_name(got)}, kernel gives {_name(want)}")
                refreshes += want > 0
                state = after
        finally:
            os.close(fd)
        # The tree the kernel leaves: finalize text, out/fdt and the producer's sub-FDT.
        shown = sup.read_file(fin)
        if shown != b"%d\n" % state:
            problems.append(f"finalize reads {shown!r}, expected {int(state)}")
            state = shown == b"1\n"
        has_fdt = os.path.exists(f"{out}/fdt")
        has_sub = os.path.exists(f"{out}/sub_fdts/{SUBTREE}")
        if abi == "7.0":
            # Both exist from boot, whatever finalize says.
            if not (has_fdt and has_sub):
                problems.append(f"out/fdt exists={has_fdt}, sub_fdts/{SUBTREE} exists={has_sub}")
            else:
                before, root = root, sup.live_root_fdt(client)
                problems += _check_70_root(root, before, sup.read_file(f"{out}/fdt"), state,
                                           refreshes)
        elif has_fdt != state or has_sub != state:
            problems.append(f"state {int(state)} but out/fdt exists={has_fdt}, "
                            f"sub_fdts/{SUBTREE} exists={has_sub}")
        if state and has_fdt and abi != "7.0":
            why = sup.fdt_problem(sup.read_file(f"{out}/fdt"), "kho-v1")
            if why:
                problems.append(f"out/fdt after finalize: {why}")
        if problems:
            failures.append(f"[from state {int(state0)}, open {mode}] " + "; ".join(problems))
    return failures


def _check_70_root(root, before, shown, state, refreshes):
    """7.0: out/fdt is the first bytes of a valid kho-v1 root FDT whose preserved-memory-map is
    0 until the first write of 1; each write of 1 serializes a new map before freeing the old
    one, so after exactly one the address differs, and without one it stays."""
    problems = []
    why = sup.fdt_problem(root, "kho-v1")
    if why:
        return [f"root FDT: {why}"]
    if len(shown) != OUT_FDT_70 or shown != root[:len(shown)]:
        problems.append(f"out/fdt ({len(shown)} bytes) is not the first {OUT_FDT_70} bytes of "
                        "the root FDT")
    old = sup.root_prop(before, "preserved-memory-map")
    new = sup.root_prop(root, "preserved-memory-map")
    if new is None or len(new) != 8:
        return problems + [f"preserved-memory-map is {new!r}"]
    if (new != bytes(8)) != state:
        problems.append(f"finalize {int(state)} but preserved-memory-map is {new.hex()}")
    if refreshes == 0 and new != old:
        problems.append("preserved-memory-map changed without a write of 1")
    if refreshes == 1 and new == old:
        problems.append("a write of 1 did not serialize the map again")
    return problems


@pytest.mark.parametrize("abi", sup.FINALIZE_PROFILES)
def test_finalize_is_not_seekable_and_truncate_changes_nothing(mounter, abi):
    mnt = mounter.mount("--cmdline", CMDLINE, "--memory", "1G", "--abi", abi)
    fin = f"{mnt}/kho/out/finalize"
    fd = os.open(fin, os.O_RDWR)
    try:
        for call in (lambda: os.pwrite(fd, b"1", 0), lambda: os.pread(fd, 2, 0),
                     lambda: os.lseek(fd, 0, os.SEEK_SET)):
            with pytest.raises(OSError) as ei:
                call()
            assert ei.value.errno == errno.ESPIPE
        # Reads continue the text captured by this open file, one byte at a time.
        assert [os.read(fd, 1) for _ in range(3)] == [b"0", b"\n", b""]
    finally:
        os.close(fd)
    for _ in range(2):
        os.close(os.open(fin, os.O_WRONLY | os.O_TRUNC))
        assert sup.read_file(fin) == b"0\n"
    sup.write_file(fin, b"1\n")
    os.truncate(fin, 0)
    assert sup.read_file(fin) == b"1\n" and os.path.exists(f"{mnt}/kho/out/fdt")


# -- 7.1: no out/finalize; random writes to what the tree does have -------------------------
# KHO-SPEC §1, §9, §10: scratch_* have no write handler (EINVAL at write(2), open succeeds);
# blobs take root's writes in place within their size (simple_write_to_buffer: at or past
# the end 0 bytes, else up to the end); a missing name is ENOENT, or EACCES with O_CREAT.
# O_APPEND: the blob's .write handler has no append mode and writes at the file position
# (0 after open). FUSE sends such a write at the stat size and cannot tell pwrite(2) from
# write(2), so with O_APPEND only write(2) is exact.
BLOBS_71 = ["fdt", "sub_fdts/memblock", "sub_fdts/kexec-metadata"]
SHOWS_71 = ["scratch_phys", "scratch_len"]
MISSING_71 = ["finalize", "sub_fdts/finalize", "fdt2"]
OPEN_71 = {"wronly": os.O_WRONLY, "rdwr": os.O_RDWR, "trunc": os.O_WRONLY | os.O_TRUNC,
           "creat": os.O_WRONLY | os.O_CREAT, "append": os.O_WRONLY | os.O_APPEND}
# (offset for pwrite, or None for write at the file position; bytes)
write_71 = st.tuples(st.one_of(st.none(), st.none(), st.integers(0, 300),
                               st.sampled_from([72, 73, 74, 209, 210, 211, 232, 233, 234])),
                     payload)
example_71 = st.tuples(st.sampled_from(BLOBS_71 * 3 + SHOWS_71 + MISSING_71),
                       st.sampled_from(list(OPEN_71)),
                       st.lists(write_71, min_size=1, max_size=3).map(tuple))


def _listing(kho):
    out = []
    for root, dirs, files in os.walk(kho):
        for name in dirs + files:
            st_ = os.lstat(os.path.join(root, name))
            out.append((os.path.relpath(os.path.join(root, name), kho), st_.st_mode, st_.st_size))
    return sorted(out)


def _write_71(fd, off, data):
    try:
        return os.write(fd, data) if off is None else os.pwrite(fd, data, off)
    except OSError as e:
        return -e.errno


# 7.4 names the scratch files boot memory; the old names are missing there.
RENAMED_74 = {"scratch_phys": "bootmem_phys", "scratch_len": "bootmem_len"}


@pytest.mark.parametrize("abi", ["7.1", "7.4"])
def test_71_writes_to_the_tree(mounter, abi):
    mnt = mounter.mount("--cmdline", CMDLINE, "--memory", "1G", "--abi", abi)
    out = f"{mnt}/kho/out"
    tree = _listing(f"{mnt}/kho")
    assert "finalize" not in os.listdir(out)
    names = RENAMED_74 if abi == "7.4" else {}
    shows = [names.get(n, n) for n in SHOWS_71]
    content = {n: bytearray(sup.read_file(f"{out}/{n}")) for n in BLOBS_71 + shows}
    if names:
        for old in names:
            with pytest.raises(FileNotFoundError):
                os.open(f"{out}/{old}", os.O_WRONLY)
            with pytest.raises(PermissionError):
                os.open(f"{out}/{old}", os.O_WRONLY | os.O_CREAT, 0o600)
    cases = sup.collect_examples(example_71, 700, seed=0x6B686F37)
    failures = []
    for target, mode, writes in cases:
        target = names.get(target, target)
        problems = []
        path = f"{out}/{target}"
        flags = OPEN_71[mode]
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as e:
            fd, err = None, e.errno
        if target in MISSING_71:
            want = errno.EACCES if flags & os.O_CREAT else errno.ENOENT
            if fd is not None:
                problems.append(f"open succeeded, the kernel gives {errno.errorcode[want]}")
            elif err != want:
                problems.append(f"open: {errno.errorcode[err]}, the kernel gives "
                                f"{errno.errorcode[want]}")
        elif fd is None:
            problems.append(f"open: {errno.errorcode[err]}")
        if fd is not None:
            pos = 0
            if flags & os.O_APPEND:
                writes = [(None, data) for _, data in writes]
            try:
                for i, (off, data) in enumerate(writes):
                    if target in shows:
                        want = -errno.EINVAL
                    else:
                        blob = content[target]
                        at = pos if off is None else off
                        want = max(0, min(len(data), len(blob) - at))
                        blob[at:at + want] = data[:want]
                        if off is None:
                            pos += want
                    got = _write_71(fd, off, data)
                    if got != want:
                        problems.append(f"write #{i} of {len(data)} bytes at "
                                        f"{'pos' if off is None else off}: got {_name(got)}, "
                                        f"the kernel gives {_name(want)}")
            finally:
                os.close(fd)
        # Nothing appears, vanishes or changes size; each file holds what the writes put there.
        now = _listing(f"{mnt}/kho")
        if now != tree:
            problems.append(f"the tree changed: {sorted(set(now) ^ set(tree))}")
        for n, want in content.items():
            got = sup.read_file(f"{out}/{n}")
            if got != want:
                problems.append(f"{n} reads other bytes than were written")
                content[n] = bytearray(got)
        if problems:
            failures.append(f"[{target}, open {mode}, {[(o, d[:20]) for o, d in writes]}] "
                            + "; ".join(problems))
    sup.check_family(f"tree writes [{abi}]", len(cases), failures)
