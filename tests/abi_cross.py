"""Kexec from one release into another, each row of docs/abi-profiles.md's table: shared by the
kernel-layer test and the one through a mount."""

# (source, next kernel) -> accepted, memory map read as written
CROSS = {
    ("6.16", "6.16"): (True, True), ("6.16", "6.18"): (True, False),
    ("6.16", "7.0"): (True, False), ("6.16", "7.1"): (False, False),
    ("6.18", "6.16"): (True, False), ("6.18", "6.18"): (True, True),
    ("6.18", "7.0"): (True, True), ("6.18", "7.1"): (False, False),
    ("7.0", "6.16"): (True, False), ("7.0", "6.18"): (True, True),
    ("7.0", "7.0"): (True, True), ("7.0", "7.1"): (False, False),
    ("7.1", "6.16"): (False, False), ("7.1", "6.18"): (False, False),
    ("7.1", "7.0"): (False, False), ("7.1", "7.1"): (True, True),
}
