"""khofs map's model without a mount: merging by order, the stretched axis, the bands."""

from khofs.devicetree.memmap import Layout, Region, fmt_size, merge_by_order, scratch_kind


def test_merge_by_order():
    got = merge_by_order([(0, 0x3000, 0x1000), (9, 0x200000, 0x200000), (0, 0x1000, 0x2000),
                          (9, 0x400000, 0x200000), (0, 0x5000, 0x1000), (1, 0x4000, 0x2000)],
                         "out")
    assert [(r.label, r.start, r.size, r.side) for r in got] == [
        ("order 0", 0x1000, 0x3000, "out"),       # adjacent runs of one order join
        ("order 0", 0x5000, 0x1000, "out"),       # a gap keeps them apart
        ("order 1", 0x4000, 0x2000, "out"),       # another order never joins
        ("order 9", 0x200000, 0x400000, "out")]


def test_scratch_kinds_and_sizes():
    assert [scratch_kind(i) for i in range(5)] == ["lowmem", "global", "node 0", "node 1", "node 2"]
    assert [fmt_size(n) for n in (0, 4095, 4096, 6 << 20, (6 << 20) + 4096, 1 << 40, 3 << 39)] == [
        "0 bytes", "4095 bytes", "4 KiB", "6 MiB", "6.00 MiB", "1 TiB", "1.50 TiB"]


def _tebibyte() -> Layout:
    lay = Layout("t", ram_size=1 << 40)
    lay.regions = [Region("ram", 0, 1 << 40, "node 0"),
                   Region("scratch", 0xf7e00000, 128 << 20, "lowmem"),
                   Region("fdt", (1 << 40) - 0x400000, 196, "out/fdt"),
                   Region("preserved", (1 << 40) - 0x400000, 4096, "order 0", 0, "out"),
                   Region("preserved", 0x100000, 4096, "order 0", 0, "in")]
    return lay


def test_warp_gives_a_page_room_in_a_tebibyte():
    from khofs.devicetree.memmap_plot import Warp
    w = Warp(_tebibyte())
    assert w(0) == 0 and w(1 << 40) == w.x[-1]
    xs = [w(a) for a in sorted(w.addr)]
    assert xs == sorted(xs)                                  # order is kept
    page = w((1 << 40) - 0x3ff000) - w((1 << 40) - 0x400000)
    assert page / w.x[-1] > 0.01                             # a page: over 1% of the axis


def test_bands_one_per_kind_and_side():
    from khofs.devicetree.memmap_plot import bands
    assert [t for t, _ in bands(_tebibyte())] == [
        "RAM", "scratch", "reserve_mem", "preserved (out)", "preserved (in)", "FDTs"]
    assert [t for t, _ in bands(Layout("empty"))] == [
        "RAM", "scratch", "reserve_mem", "preserved", "FDTs"]
