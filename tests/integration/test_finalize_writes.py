"""Writes to out/finalize through the mount: kstrtoull(base 0) on the first 23 bytes (§2, §10)."""

import os

import pytest

from khoit import ISSUE_ARGS, ISSUE_CMDLINE, read, sh, write_bytes

# Both finalize ABIs parse writes the same way.
pytestmark = pytest.mark.parametrize(
    "issue_mount", [(ISSUE_CMDLINE, *ISSUE_ARGS), (ISSUE_CMDLINE, *ISSUE_ARGS, "--abi", "6.16")],
    ids=["abi6.18", "abi6.16"], indirect=True, scope="module")

U64_MAX = b"18446744073709551615"

FINALIZING = [b"1", b"0x1", b"0X1", b"+1", b"01", b"2", b"1\n", b"1\0", U64_MAX,
              b"0" * 22 + b"1", b"+0x1", b"1\n\0", b"1\0abc", b"0777", b"0XfF",
              b"0xffffffffffffffff", b"0" * 21 + b"1\n"]
ABORTING = [b"0", b"00", b"0x0", b"+0", b"0\n", b"0" * 23 + b"1"]
INVALID = [b" 1", b"1 ", b"1\r\n", b"1\n\n", b"-1", b"abc", b"y", b"0x", b"08", b"+", b"\n",
           b"+-1", b"0x1g", b"1\t", b"\0" + b"1", b"\0", b"00x1", b"0xg", b"1_000", b"++1",
           b"0b1", b"1.0"]


def fin(m):
    return os.path.join(m.out, "finalize")


def has_fdt(m):
    return os.path.exists(os.path.join(m.out, "fdt"))


@pytest.fixture
def in_state(request, issue_mount):
    """The module mount in the state named by the indirect parameter."""
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("data", FINALIZING, ids=repr)
def test_nonzero_finalizes(unfinalized, data):
    assert write_bytes(fin(unfinalized), data) == len(data)
    assert read(fin(unfinalized)) == b"1\n"
    assert has_fdt(unfinalized)


@pytest.mark.parametrize("data", FINALIZING, ids=repr)
def test_nonzero_when_finalized_is_eexist(finalized, data):
    assert write_bytes(fin(finalized), data) == "EEXIST"
    assert read(fin(finalized)) == b"1\n"
    assert has_fdt(finalized)


@pytest.mark.parametrize("data", ABORTING, ids=repr)
def test_zero_aborts(finalized, data):
    assert write_bytes(fin(finalized), data) == len(data)
    assert read(fin(finalized)) == b"0\n"
    assert not has_fdt(finalized)
    assert os.listdir(os.path.join(finalized.out, "sub_fdts")) == []


@pytest.mark.parametrize("data", ABORTING, ids=repr)
def test_zero_when_not_finalized_is_enoent(unfinalized, data):
    assert write_bytes(fin(unfinalized), data) == "ENOENT"
    assert read(fin(unfinalized)) == b"0\n"
    assert not has_fdt(unfinalized)


@pytest.mark.parametrize("in_state", ["unfinalized", "finalized"], indirect=True)
@pytest.mark.parametrize("data", INVALID, ids=repr)
def test_invalid_is_einval_before_state_check(in_state, data):
    m = in_state
    before = read(fin(m))
    assert write_bytes(fin(m), data) == "EINVAL"
    assert read(fin(m)) == before
    assert has_fdt(m) == (before == b"1\n")


@pytest.mark.parametrize("in_state", ["unfinalized", "finalized"], indirect=True)
@pytest.mark.parametrize("data", [b"18446744073709551616", b"0x10000000000000000",
                                  b"99999999999999999999\n", b"02" + b"0" * 21],
                         ids=repr)
def test_u64_overflow_is_erange(in_state, data):
    m = in_state
    before = read(fin(m))
    assert write_bytes(fin(m), data) == "ERANGE"
    assert read(fin(m)) == before


def test_only_first_23_bytes_are_parsed(unfinalized):
    # 23 zeros then "1": the "1" is cut off, so this is an abort (ENOENT unfinalized).
    assert write_bytes(fin(unfinalized), b"0" * 23 + b"1") == "ENOENT"
    assert write_bytes(fin(unfinalized), b"0" * 22 + b"1") == 23
    assert read(fin(unfinalized)) == b"1\n"
    assert write_bytes(fin(unfinalized), b"0" * 23 + b"1") == 24
    assert read(fin(unfinalized)) == b"0\n"


def test_long_write_returns_full_length(unfinalized):
    data = b"1\0" + b"x" * 98
    assert write_bytes(fin(unfinalized), data) == 100
    assert read(fin(unfinalized)) == b"1\n"


def test_write_offset_is_ignored(unfinalized):
    fd = os.open(fin(unfinalized), os.O_WRONLY)
    try:
        assert os.write(fd, b"1") == 1
        # The file position moved past 0; the next write is parsed from its own start.
        assert os.write(fd, b"0") == 1
    finally:
        os.close(fd)
    assert read(fin(unfinalized)) == b"0\n"


@pytest.mark.parametrize("in_state", ["unfinalized", "finalized"], indirect=True)
def test_truncating_open_without_write_changes_nothing(in_state):
    m = in_state
    before = read(fin(m))
    r = sh(f": > {fin(m)}")
    assert (r.returncode, r.stderr) == (0, "")
    r = sh(f"echo -n '' > {fin(m)}")
    assert (r.returncode, r.stderr) == (0, "")
    assert read(fin(m)) == before
    assert has_fdt(m) == (before == b"1\n")


def test_shell_invalid_write_message(unfinalized):
    r = sh(f"echo abc > {fin(unfinalized)}")
    assert r.returncode == 1
    assert "write error: Invalid argument" in r.stderr
    r = sh(f"echo 18446744073709551616 > {fin(unfinalized)}")
    assert r.returncode == 1
    assert "write error: Numerical result out of range" in r.stderr
    assert read(fin(unfinalized)) == b"0\n"

