"""Device-tree text and decoding for users: DTS in (dts.py), DTS out and diffs (diff.py), the
KHO-aware decoder behind `khofs dump` (dump.py), the physical layout behind `khofs map`
(memmap.py, drawn by memmap_plot.py).

Why two libraries: the kernel builds its FDTs with libfdt, so bytes that must match the
kernel's (every producer's sub-FDT, checks of a blob) come from pylibfdt, which is libfdt
itself; text (parsing DTS, writing it, comparing trees) is what the fdt package is for, and
needs no dtc. Nothing here prints, knows FUSE or trio, or imports the daemon or the CLI.
"""
