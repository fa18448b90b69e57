"""The next kernel meets a corrupted handover: khofs says what a real kernel would trip over,
and neither crashes nor hangs."""

import struct

import libfdt

from khofs.kernel.fdt import getprop, subnodes
from khofs.kernel.kho_fdt import PROP_PRESERVED_MEMORY_MAP
from khofs.kernel.machine import Machine, MachineConfig
from khofs.kernel.physmem import PAGE_SIZE, Memblock, PageAllocator, PhysMem

G = 1 << 30


def finalized(cmdline="kho=on reserve_mem=1M:4096:oops"):
    m = Machine(cmdline, MachineConfig(memory=G))
    p = m.pages.alloc_range(4)
    m.kho_out.preserve_pages(p, 4 * PAGE_SIZE)
    m.kho_out.set_finalize(1)
    return m


def first_chunk(m):
    page = m.mem.read(m.kho_out.fdt_page, PAGE_SIZE)
    return int.from_bytes(getprop(page, 0, PROP_PRESERVED_MEMORY_MAP), "little")


def next_boot(m, cmdline=None):
    m.kexec_load(cmdline)
    ho = m.kexec_exec()
    return Machine(ho.cmdline, MachineConfig(**ho.config), handover=ho)


def texts(m):
    return [line.text for line in m.dmesg]


def test_bitmap_naming_memory_past_the_end_boots_and_says_so():
    m = finalized()
    chunk = first_chunk(m)
    m.mem.write(chunk + 16, struct.pack("<Q", 1 << 50))     # first element's phys_start
    nxt = next_boot(m)
    assert nxt.kho_in is not None
    assert any("outside memory" in t and "struct pages that do not exist" in t for t in texts(nxt))
    # The boot's allocators still hand out real memory.
    p = nxt.pages.alloc_pages(0)
    assert 0 < p < G


def test_chunk_list_loop_is_reported_at_once():
    m = finalized()
    chunk = first_chunk(m)
    m.mem.write(chunk, struct.pack("<Q", chunk))            # next points to itself
    nxt = next_boot(m)
    assert any("loops back" in t for t in texts(nxt))


def test_page_allocator_ignores_reservations_past_memory():
    mem = PhysMem(64 << 20)
    mb = Memblock(mem)
    mb.reserve(1 << 40, 1 << 20)
    pa = PageAllocator(mem, mb)
    p = pa.alloc_pages(0)
    assert p == (64 << 20) - PAGE_SIZE


def test_fdt_claiming_more_than_its_buffer_is_read_as_truncated():
    sw = libfdt.FdtSw()
    sw.finish_reservemap()
    sw.begin_node("")
    sw.property_string("compatible", "x")
    sw.begin_node("child")
    sw.end_node()
    sw.end_node()
    blob = bytearray(sw.as_fdt().as_bytearray())
    blob = blob[:struct.unpack_from(">I", blob, 4)[0]]
    assert getprop(bytes(blob), 0, "compatible") == b"x\0"
    struct.pack_into(">II", blob, 4, 0x7FFFFFFF, 0x7FF00000)   # totalsize, off_dt_struct
    assert getprop(bytes(blob), 0, "compatible") is None
    assert list(subnodes(bytes(blob), 0)) == []


def test_sub_fdt_running_past_memory_is_reported():
    m = finalized()
    sub = m.kho_out.blobs("sub_fdts")[0]
    m.mem.write(sub.phys + 4, struct.pack(">I", 0x7FFFFFFF))
    nxt = next_boot(m)
    assert nxt.kho_in is not None
    assert any("runs past the end of memory" in t for t in texts(nxt))


def test_kho_off_next_boot_does_not_look_at_sub_fdts():
    # kho_in_debugfs_init() runs only at the end of kho_init(), which kho=off skips.
    m = finalized()
    sub = m.kho_out.blobs("sub_fdts")[0]
    m.mem.write(sub.phys + 4, struct.pack(">I", 0x7FFFFFFF))
    nxt = next_boot(m, "kho=off")
    assert nxt.kho_in is not None and nxt.kho_out is None
    assert not any("sub-FDT" in t for t in texts(nxt))


def test_in_fdt_past_the_end_of_memory_is_said():
    m = Machine("kho=on", MachineConfig(memory=1 << 30))
    m.kho_out.set_finalize(1)
    fdt = m.kho_out.fdt_page
    m.mem.write(fdt + 4, (m.mem.size - fdt + 1).to_bytes(4, "big"))      # header totalsize
    m.kexec_load()
    ho = m.kexec_exec()
    nxt = Machine(ho.cmdline, MachineConfig(**ho.config), ho)
    assert f"khofs: in/fdt at 0x{fdt:x} ({m.mem.size - fdt + 1} bytes, as its header says) " \
        "runs past the end of memory: reading beyond it fails with EFAULT (a real kernel " \
        "would fault)" in [line.text for line in nxt.warnings()]
