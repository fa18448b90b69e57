"""Helpers of the ecosystem tests, on the shared ones."""

from khofs_testlib import KHOFS, is_mounted as mounted, run_khofs  # noqa: F401


def khofs(*args, **kw):
    """khofs ARGS with text output."""
    return run_khofs(*args, text=True, **kw)
