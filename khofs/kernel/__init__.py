"""The emulated KHO kernel: pure and synchronous, no FUSE, no trio."""

from .errors import KernelError

__all__ = ["KernelError"]
