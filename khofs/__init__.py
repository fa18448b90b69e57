"""khofs: Linux Kexec HandOver (KHO) debugfs, emulated over FUSE."""

__version__ = "0.1.0"
