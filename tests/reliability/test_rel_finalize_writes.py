"""Bad input, family (a): writes to kho/out/finalize through a real mount.

Every write is judged against an oracle written from KHO-SPEC §2 (simple_attr_write +
kstrtoull), and the tree is checked afterwards for the state the kernel would leave.
"""

import errno
import os

import pytest
from hypothesis import strategies as st

import khofs_rel_support as sup

pytestmark = pytest.mark.fuse

CMDLINE = "kho=on reserve_mem=1M:4096:relfin"
SUBTREE = "memblock"

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


def test_finalize_writes(mounter):
    mnt = mounter.mount("--cmdline", CMDLINE, "--memory", "1G")
    out = f"{mnt}/kho/out"
    fin = f"{out}/finalize"

    corpus = sup.load_corpus("finalize_writes.txt")
    cases = [(state, "wronly", (data,)) for data in corpus for state in (False, True)]
    seen = {repr(c) for c in cases}
    for c in sup.collect_examples(example, 700, seed=0x6B686F31):
        if repr(c) not in seen:
            seen.add(repr(c))
            cases.append(c)

    state = False
    failures = []

    def set_state(want):
        fd = os.open(fin, os.O_WRONLY)
        try:
            assert os.write(fd, b"1\n" if want else b"0\n") == 2
        finally:
            os.close(fd)

    for state0, mode, writes in cases:
        if state != state0:
            set_state(state0)
            state = state0
        problems = []
        fd = os.open(fin, OPEN_FLAGS[mode])
        try:
            for i, data in enumerate(writes):
                want, after = sup.finalize_write_oracle(data, state)
                got = _write(fd, data)
                if got != want:
                    problems.append(f"write #{i} of {data[:40]!r} (len {len(data)}) in state "
                                    f"{int(state)}: got {_name(got)}, kernel gives {_name(want)}")
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
        if has_fdt != state or has_sub != state:
            problems.append(f"state {int(state)} but out/fdt exists={has_fdt}, "
                            f"sub_fdts/{SUBTREE} exists={has_sub}")
        if state and has_fdt:
            why = sup.fdt_problem(sup.read_file(f"{out}/fdt"), "kho-v1")
            if why:
                problems.append(f"out/fdt after finalize: {why}")
        if problems:
            failures.append(f"[from state {int(state0)}, open {mode}] " + "; ".join(problems))

    sup.check_family("finalize writes", len(cases), failures)


def test_finalize_is_not_seekable_and_truncate_changes_nothing(mounter):
    mnt = mounter.mount("--cmdline", CMDLINE, "--memory", "1G")
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
