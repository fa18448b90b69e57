import errno as _errno
import os


class KernelError(Exception):
    """A kernel call failed with a (positive) errno, as the kernel would return -errno."""

    def __init__(self, err: int, message: str = ""):
        self.errno = err
        self.message = message or os.strerror(err)
        super().__init__(f"{_errno.errorcode.get(err, err)}: {self.message}")
