"""Kexec from one release into another, each row of docs/abi-profiles.md's table: shared by the
kernel-layer test and the one through a mount.

(source, next kernel) -> (accepted, memory map read as written, rejection): a rejection is
the compatible the next kernel wanted and its revival line (`kho_populate` checks the root's
compatible first, so a different one is always refused there).
"""

V1 = ("kho-v1", "KHO: disabling KHO revival: -22")
V3 = ("kho-v3", "KHO: disabling KHO revival")
V4 = ("kho-v4", "KHO: disabling KHO revival")
OK, MISREAD = (True, True, None), (True, False, None)


def _rejected(want):
    return (False, False, want)


CROSS = {
    ("6.16", "6.16"): OK, ("6.16", "6.18"): MISREAD, ("6.16", "7.0"): MISREAD,
    ("6.16", "7.1"): _rejected(V3), ("6.16", "7.2"): _rejected(V4), ("6.16", "7.4"): _rejected(V4),
    ("6.18", "6.16"): MISREAD, ("6.18", "6.18"): OK, ("6.18", "7.0"): OK,
    ("6.18", "7.1"): _rejected(V3), ("6.18", "7.2"): _rejected(V4), ("6.18", "7.4"): _rejected(V4),
    ("7.0", "6.16"): MISREAD, ("7.0", "6.18"): OK, ("7.0", "7.0"): OK,
    ("7.0", "7.1"): _rejected(V3), ("7.0", "7.2"): _rejected(V4), ("7.0", "7.4"): _rejected(V4),
    ("7.1", "6.16"): _rejected(V1), ("7.1", "6.18"): _rejected(V1), ("7.1", "7.0"): _rejected(V1),
    ("7.1", "7.1"): OK, ("7.1", "7.2"): _rejected(V4), ("7.1", "7.4"): _rejected(V4),
    ("7.2", "6.16"): _rejected(V1), ("7.2", "6.18"): _rejected(V1), ("7.2", "7.0"): _rejected(V1),
    ("7.2", "7.1"): _rejected(V3), ("7.2", "7.2"): OK, ("7.2", "7.4"): OK,
    ("7.4", "6.16"): _rejected(V1), ("7.4", "6.18"): _rejected(V1), ("7.4", "7.0"): _rejected(V1),
    ("7.4", "7.1"): _rejected(V3), ("7.4", "7.2"): OK, ("7.4", "7.4"): OK,
}
