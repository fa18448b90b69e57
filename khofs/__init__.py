"""khofs: Linux Kexec HandOver (KHO) debugfs, emulated over FUSE."""

__version__ = "0.1.0"


def __getattr__(name):
    # The client is importable as khofs.Client without loading the daemon's modules.
    if name == "Client":
        from .client import Client
        return Client
    raise AttributeError(name)
