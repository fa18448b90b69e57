"""Device-tree text and decoding for users: DTS in (dts.py), DTS out and diffs (diff.py), the
KHO-aware decoder behind `khofs dump` (dump.py).

The fdt package reads and writes text; pylibfdt checks and builds bytes the kernel's way.
Nothing here prints, knows FUSE or trio, or imports the daemon or the CLI.
"""
