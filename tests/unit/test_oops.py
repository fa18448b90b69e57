"""The revival line of each profile, and what each profile does after a write into out/fdt:
7.0's oops in kho_finalize and the kho_out.lock it leaves held (KHO-SPEC §9), 6.16/6.18's
finalize that rebuilds the FDT, 7.1's next kernel that rejects it."""

import errno

import pytest

from khofs.fs.debugfs import Tree
from khofs.kernel.errors import KernelError
from khofs.kernel.handover import Handover
from khofs.kernel.machine import Machine, MachineConfig
from khofs.kernel.oops import CAUSE_OTHER, CAUSE_OUT_FDT, LockHeld, Oops, Task
from khofs.kernel.physmem import PAGE_SIZE

G = 1 << 30
CMDLINE = "kho=on reserve_mem=1M:4096:test_resv khofs.test_kho=1"
WRITER = Task(4242, 0, "sh")
OOPS_LINES = [
    "BUG: kernel NULL pointer dereference, address: 0000000000000000",
    "#PF: supervisor write access in kernel mode",
    "#PF: error_code(0x0002) - not-present page",
    "Oops: 0002 [#1] SMP NOPTI",
    "CPU: 0 UID: 0 PID: 4242 Comm: sh Not tainted 7.0.0-khofs #1",
    "RIP: 0010:kho_finalize",
    "Call Trace:",
    " <TASK>",
    " kho_out_finalize_set",
    " simple_attr_write_xsigned",
    " debugfs_attr_write",
    " full_proxy_write",
    " vfs_write",
    " ksys_write",
    " do_syscall_64",
    " entry_SYSCALL_64_after_hwframe",
    " </TASK>",
    "CR2: 0000000000000000",
    "---[ end trace 0000000000000000 ]---",
]


def boot(abi):
    return Machine(CMDLINE, MachineConfig(memory=G, abi=abi))


def kexec(m):
    m.kexec_load()
    ho = Handover.loads(m.kexec_exec().dumps())
    return Machine(ho.cmdline, MachineConfig(**ho.config), ho, release=ho.release)


def texts(m):
    return [line.text for line in m.dmesg]


def kho_lines(m):
    return [t for t in texts(m) if t.startswith("KHO: ") and "scratch areas" not in t]


def files(m):
    t = Tree(m)
    return t, t.lookup(t.out, "finalize") if m.profile.has_finalize else None


def write_out_fdt(m, data=b"x\n"):
    """echo x > out/fdt, through the debugfs blob."""
    t = Tree(m)
    return t.lookup(t.out, "fdt").open().write(0, data)


def oopsed():
    m = boot("7.0")
    write_out_fdt(m)
    _, fin = files(m)
    with pytest.raises(Oops) as e:
        fin.open(WRITER).write(0, b"1\n")
    return m, fin, e.value


# -- the revival line ---------------------------------------------------------------------
# A handover whose root FDT has a bad magic: kho_populate's two lines, per profile. The
# number went with "kho: cleanup error handling in kho_populate()" after v6.19.
INVALID_FDT_LINES = {
    "6.16": "KHO: disabling KHO revival: -22",
    "6.18": "KHO: disabling KHO revival: -22",
    "7.0": "KHO: disabling KHO revival",
    "7.1": "KHO: disabling KHO revival",
}


@pytest.mark.parametrize("abi", sorted(INVALID_FDT_LINES))
def test_revival_line_after_an_invalid_handover_fdt(abi):
    m = boot(abi)
    if m.profile.has_finalize:
        m.kho_out.set_finalize(1)
    m.mem.write(m.kho_out.fdt_page, b"x\n")
    n = kexec(m)
    lines = kho_lines(n)
    assert lines[0] == f"KHO: setup: handover FDT (0x{m.kho_out.fdt_page:x}) is invalid: -9"
    assert lines[1:] == [INVALID_FDT_LINES[abi]]
    assert n.kho_in is None


@pytest.mark.parametrize("abi", ["7.0", "7.1"])
def test_revival_line_for_a_map_of_0(abi):
    # 7.0 hands over the map 0 it booted with until a finalize; 7.1's is 0 only if written so.
    m = boot(abi)
    if abi == "7.1":
        _zero_map(m)
    assert kho_lines(kexec(m)) == ["KHO: disabling KHO revival"]


def _zero_map(m):
    from khofs.kernel.fdt import prop_value_offset
    page = m.mem.read(m.kho_out.fdt_page, PAGE_SIZE)
    m.mem.write(m.kho_out.fdt_page + prop_value_offset(page, 0, "preserved-memory-map"),
                bytes(8))


def test_each_profile_says_whether_it_prints_the_number():
    from khofs.kernel.profile import PROFILES
    assert {n: p.revival_errno for n, p in PROFILES.items()} == {
        "6.16": True, "6.18": True, "7.0": False, "7.1": False, "7.2": False, "7.4": False}
    assert PROFILES["6.18"].revival_line(-2) == "KHO: disabling KHO revival: -2"
    assert PROFILES["7.0"].revival_line(-2) == "KHO: disabling KHO revival"


# -- 7.0: the oops ------------------------------------------------------------------------
def test_70_finalize_after_a_write_into_out_fdt_oopses():
    m, _, e = oopsed()
    assert e.errno == errno.EIO                     # what an uncaught Oops answers
    assert e.record.task == WRITER and e.record.cause == CAUSE_OUT_FDT
    assert e.record.magic == b"x\n\xfe\xed"
    log = texts(m)
    start = log.index(OOPS_LINES[0])
    assert log[start:start + len(OOPS_LINES)] == OOPS_LINES
    cause = log[start + len(OOPS_LINES)]
    assert cause.startswith("khofs: oops cause: a write into out/fdt corrupted the live root "
                            "FDT (its first bytes are now 78 0a fe ed, not d0 0d fe ed)")
    assert e.lines == OOPS_LINES + [cause]
    assert log[start + len(OOPS_LINES) + 1:] == []
    # The oops came before kho_out.finalized was set.
    assert m.kho_out.finalized is False


def test_70_status_names_the_oops_its_cause_and_the_taint():
    m, _, _ = oopsed()
    st = m.status()
    assert st["tainted"] == "G      D"
    assert st["oops"] == {
        "bug": "BUG: kernel NULL pointer dereference, address: 0000000000000000",
        "function": "kho_finalize", "cause": "a write into out/fdt corrupted the live root FDT",
        "pid": 4242, "comm": "sh", "lock": "kho_out.lock", "lock_waiters": 0}
    fresh = boot("7.0").status()
    assert fresh["oops"] is None and fresh["tainted"] is None


def test_70_after_the_oops_every_taker_of_kho_out_lock_would_sleep():
    m, fin, _ = oopsed()
    for call in (lambda: fin.open().write(0, b"1"),           # kho_finalize
                 lambda: fin.open().read(0, 24),              # kho_finalized()
                 lambda: m.kho_out.add_subtree("late", m.kho_out.blobs("sub_fdts")[0].phys),
                 lambda: m.kho_out.remove_subtree(m.kho_out.blobs("sub_fdts")[0].phys)):
        with pytest.raises(LockHeld) as e:
            call()
        assert e.value.errno == errno.EDEADLK and e.value.kho_out is m.kho_out
    # Neither parsing nor a 0 reaches the lock; stat needs no lock either.
    with pytest.raises(KernelError) as e:
        fin.open().write(0, b"0")
    assert e.value.errno == errno.EINVAL
    assert fin.content_size() == 2
    # Preservations do not take kho_out.lock.
    p = m.pages.alloc_range(1)
    m.kho_out.preserve_pages(p, PAGE_SIZE)


def test_70_the_test_module_loaded_after_the_oops_would_sleep_too():
    m = Machine("kho=on", MachineConfig(memory=G, abi="7.0"))
    write_out_fdt(m)
    _, fin = files(m)
    with pytest.raises(Oops):
        fin.open(WRITER).write(0, b"1")
    with pytest.raises(LockHeld) as e:
        m.start_test_kho()                         # its init calls kho_add_subtree
    assert e.value.what == "kho_add_subtree"


def test_70_kexec_after_the_oops_is_rejected_and_the_next_kernel_is_clean():
    m, _, _ = oopsed()
    n = kexec(m)
    assert kho_lines(n) == [
        f"KHO: setup: handover FDT (0x{m.kho_out.fdt_page:x}) is invalid: -9",
        "KHO: disabling KHO revival"]
    assert n.status()["oops"] is None and n.status()["tainted"] is None
    _, fin = files(n)
    assert fin.open().read(0, 24) == b"0\n"
    fin.open().write(0, b"1")                      # the new kernel's lock is free


def test_70_oops_follows_libfdt_not_the_write():
    # A write into out/fdt that leaves the property findable does not oops: the map's
    # address is stored and the next kernel judges the rest.
    m = boot("7.0")
    blob = m.kho_out.blobs("out")[0]
    at = m.mem.read(m.kho_out.fdt_page, PAGE_SIZE).index(b"kho-v1")
    t = Tree(m)
    assert t.lookup(t.out, "fdt").open().write(at, b"kho-v9") == 6
    assert blob.written
    _, fin = files(m)
    fin.open(WRITER).write(0, b"1")
    assert m.kho_out.oops is None and m.kho_out.preserved_mem_map != 0
    assert kho_lines(kexec(m))[0].endswith("is incompatible with 'kho-v1': 1")


def test_70_a_good_magic_with_a_broken_structure_still_oopses_and_says_so():
    m = boot("7.0")
    page = m.mem.read(m.kho_out.fdt_page, PAGE_SIZE)
    # off_dt_strings past the end: every property name lookup fails.
    write_out_fdt(m, page[:12] + (0xFFFF).to_bytes(4, "big"))
    _, fin = files(m)
    with pytest.raises(Oops) as e:
        fin.open(WRITER).write(0, b"1")
    assert e.value.record.cause == CAUSE_OUT_FDT
    assert e.value.lines[-1].startswith(
        "khofs: oops cause: a write into out/fdt corrupted the live root FDT (libfdt no longer "
        "finds its properties): kho_finalize found no preserved-memory-map")


def test_70_corruption_not_through_out_fdt_is_named_so():
    m = boot("7.0")
    m.mem.write(m.kho_out.fdt_page, b"\0\0\0\0")  # e.g. khofs ctl mem write
    _, fin = files(m)
    with pytest.raises(Oops) as e:
        fin.open(WRITER).write(0, b"1")
    assert e.value.record.cause == CAUSE_OTHER
    assert "not through out/fdt" in texts(m)[-1]


# -- the other profiles after a write into out/fdt -----------------------------------------
@pytest.mark.parametrize("abi", ["6.16", "6.18"])
def test_finalize_rebuilds_the_fdt_so_an_aborted_write_is_lost(abi):
    m = boot(abi)
    _, fin = files(m)
    fin.open().write(0, b"1")                      # out/fdt exists only while finalized
    write_out_fdt(m)
    assert m.mem.read(m.kho_out.fdt_page, 4) == b"x\n\xfe\xed"
    assert fin.open(WRITER).write(0, b"0") == 1
    assert fin.open(WRITER).write(0, b"1") == 1    # finalize builds the FDT anew
    assert m.mem.read(m.kho_out.fdt_page, 4) == b"\xd0\x0d\xfe\xed"
    assert m.kho_out.oops is None and m.status()["tainted"] is None
    n = kexec(m)
    assert n.kho_in is not None
    assert "Revived memory reservation 'test_resv' from KHO" in texts(n)


@pytest.mark.parametrize("abi", ["6.16", "6.18"])
def test_a_write_into_a_finalized_out_fdt_reaches_the_next_kernel(abi):
    m = boot(abi)
    _, fin = files(m)
    fin.open().write(0, b"1")
    write_out_fdt(m)
    with pytest.raises(KernelError) as e:          # already finalized: nothing rebuilds it
        fin.open(WRITER).write(0, b"1")
    assert e.value.errno == errno.EEXIST
    assert kho_lines(kexec(m))[1:] == ["KHO: disabling KHO revival: -22"]


def test_71_has_no_finalize_and_the_next_kernel_rejects_the_write():
    m = boot("7.1")
    assert write_out_fdt(m) == 2
    _, fin = files(m)
    assert fin is None
    assert kho_lines(kexec(m))[-2:] == [
        f"KHO: setup: handover FDT (0x{m.kho_out.fdt_page:x}) is invalid: -9",
        "KHO: disabling KHO revival"]
    assert m.kho_out.oops is None
