"""Fixtures that mount khofs through its CLI and always take the mount down again."""

import os
from pathlib import Path

import pytest

from khofs_testlib import cleaned_up
from khoit import ISSUE_ARGS, ISSUE_CMDLINE, Mounter, PathMounts, read, write_bytes

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.fuse)


def _pool(request):
    # @pytest.mark.khofs(fresh=True): every mount of the test is its own.
    marker = request.node.get_closest_marker("khofs")
    if marker and marker.kwargs.get("fresh"):
        return None
    return request.getfixturevalue("khofs_pool")


@pytest.fixture
def mount_khofs(tmp_path, request):
    """mount_khofs(*extra_args, cmdline="kho=on", name=None, check=True) -> Mount; the first
    unnamed one may be the worker's reused mount, rebooted."""
    with cleaned_up(Mounter(tmp_path, _pool(request))) as m:
        yield m


@pytest.fixture
def path_mounts(tmp_path, request):
    """path_mounts(*args, name="mnt") -> realpath of a khofs mount booted from args; the
    first unnamed one may be the worker's reused mount, rebooted; the others always
    unmounted after the test."""
    with cleaned_up(PathMounts(tmp_path, _pool(request))) as m:
        yield m


@pytest.fixture(scope="module")
def module_mounter(tmp_path_factory):
    with cleaned_up(Mounter(tmp_path_factory.mktemp("mnt"))) as m:
        yield m


@pytest.fixture(scope="module")
def issue_mount(module_mounter, request):
    """One mount per module; indirect parametrization may pass (cmdline, *extra_args)."""
    cmdline, *extra = getattr(request, "param", (ISSUE_CMDLINE, *ISSUE_ARGS))
    return module_mounter(*extra, cmdline=cmdline)


@pytest.fixture
def unfinalized(issue_mount):
    """The module mount, asserted unfinalized before the test and reset to it after."""
    fin = os.path.join(issue_mount.out, "finalize")
    assert read(fin) == b"0\n"
    yield issue_mount
    if read(fin) == b"1\n":
        assert write_bytes(fin, b"0") == 1


@pytest.fixture
def finalized(unfinalized):
    fin = os.path.join(unfinalized.out, "finalize")
    assert write_bytes(fin, b"1") == 1
    assert read(fin) == b"1\n"
    return unfinalized
