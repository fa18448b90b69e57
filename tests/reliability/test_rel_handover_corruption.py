"""Bad input, family (b): corrupted handovers (root FDT, memory-map chunks, bitmaps, sub-FDTs).

Most cases run against the kernel layer: build and finalize a machine, corrupt its memory the
way root can (in-place writes into out/fdt, or `khofs ctl mem write`), kexec, boot the next
kernel and read every file of its debugfs tree. Each case runs in a forked child, so a crash or
a hang of the code under test is a counted failure. A handful go through a real mount.
"""

import errno
import json
import os
import random
import struct

import libfdt
import pytest
from hypothesis import strategies as st

import khofs_rel_support as sup
from khofs.fs.debugfs import Tree
from khofs.kernel.errors import KernelError
from khofs.kernel.machine import Machine, MachineConfig
from khofs.kernel.producers.user import UserSubtree

ACCEPTED = "KHO: found kexec handover data. Will skip init for some devices"
REVIVAL_OFF = "KHO: disabling KHO revival: "
BITMAPS_MSG = "KHO: failed to get preserved memory bitmaps"
NO_ROOT_FDT = "khofs: kho_init: no free page for the root FDT (-ENOMEM), KHO disabled"
REASONS = ("is invalid: ", "is incompatible with 'kho-v1': ", "failed to memremap")
GiB = 1 << 30


# -- the machines whose handover gets corrupted -------------------------------------------
def build_base(kind):
    if kind == "6.18":
        m = Machine("kho=on reserve_mem=1M:4096:oops", MachineConfig(memory=GiB))
    elif kind == "6.16":
        m = Machine("kho=on reserve_mem=1M:4096:oops", MachineConfig(memory=GiB, abi="6.16"))
    else:                                   # more than 255 order-0 bitmaps: a chunk chain
        m = Machine("kho=on", MachineConfig(memory=64 * GiB))
    kho = m.kho_out
    if kind in ("6.18", "6.16"):
        p = m.pages.alloc_range(64)
        m.mem.write(p, bytes(range(256)) * 64)
        kho.preserve_pages(p + 3 * sup.PAGE, 5 * sup.PAGE)
        f = m.pages.alloc_pages(4)
        kho.preserve_folio(f, 4)
        kho.register_notifier(UserSubtree(kho, "relsub", sup.small_dtb("rel-v1", {"n": 7})))
    else:
        for k in range(300):
            kho.preserve_pages(k * (128 << 20) + sup.PAGE, sup.PAGE)
    kho.set_finalize(1)
    page = m.mem.read(kho.fdt_page, sup.PAGE)
    f = libfdt.Fdt(bytearray(page))
    props = {}
    off = f.first_property_offset(0)
    while off >= 0:
        p = f.get_property_by_offset(off)
        props[p.name] = f.off_dt_struct() + off + 12
        off = f.next_property_offset(off, (libfdt.NOTFOUND,))
    chunks = list(kho.map_chunks)
    return {"m": m, "kind": kind, "page": page, "compat_off": props["compatible"],
            "map_off": props["preserved-memory-map"],
            "map_nameoff": struct.unpack_from(">I", page, props["preserved-memory-map"] - 4)[0],
            "chunks": chunks, "subs": [b.phys for d, b in kho.fdt_list if d == "sub_fdts"]}


# -- corruptions ---------------------------------------------------------------------------
U32 = st.one_of(st.sampled_from([0, 1, 2, 15, 16, 17, 18, 27, 28, 40, 0x38, 4095, 4096, 4097,
                                 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]),
                st.integers(0, 0xFFFFFFFF), st.integers(0, 5000))
U64 = st.one_of(st.sampled_from([0, 1, 4096, GiB, GiB - 8, 1 << 40, 1 << 50, (1 << 64) - 1,
                                 (1 << 64) - 4096]),
                st.integers(0, (1 << 64) - 1), st.integers(0, 1 << 31))
SEL = st.integers(0, 15)
CHUNK_TARGET = st.one_of(st.sampled_from(["zero", "unaligned", "beyond", "fdt", "zero"]), U64,
                         st.sampled_from(["self", "first", "prev"]))
BITMAP_TARGET = st.one_of(st.sampled_from(["beyond", "edge", "fdt", "chunk", "unaligned", "max"]),
                          U64)

mutation = st.one_of(
    st.tuples(st.just("hdr"), st.integers(0, 9), U32),
    st.tuples(st.just("bytes"), st.integers(0, 300), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("compat"), st.one_of(
        st.sampled_from([b"kho-v1", b"kho-v2", b"KHO-V1", b"kho-v0", b"kho\0v1", b"\0" * 6,
                         b"1v-ohk", b"kho-v\0"]),
        st.binary(min_size=6, max_size=6))),
    st.tuples(st.just("mapval"), st.one_of(U64, st.sampled_from(["self", "chunk0", "chunk0+8",
                                                                  "fdt"]))),
    st.tuples(st.just("maplen"), U32),
    st.tuples(st.just("mapname"), U32),
    st.tuples(st.just("trunc"), st.integers(0, 300)),
    st.tuples(st.just("garbage"), st.integers(0, 1 << 32)),
    st.tuples(st.just("chunk_next"), SEL, CHUNK_TARGET),
    st.tuples(st.just("chunk_order"), SEL, U32),
    st.tuples(st.just("chunk_num"), SEL, U32),
    st.tuples(st.just("elm_bitmap"), SEL, SEL, BITMAP_TARGET),
    st.tuples(st.just("elm_start"), SEL, SEL, U64),
    st.tuples(st.just("bitmap_fill"), SEL, SEL, st.sampled_from([b"\xff", b"\x55", b"\x01", b"\x80"])),
    st.tuples(st.just("sub_hdr"), SEL, st.integers(0, 9), U32),
    st.tuples(st.just("sub_bytes"), SEL, st.integers(0, 300), st.binary(min_size=1, max_size=16)),
)

BASE_KINDS = ["6.18", "6.18", "6.16", "chain"]     # the default ABI drawn twice as often
example = st.tuples(st.integers(0, len(BASE_KINDS) - 1),
                    st.lists(mutation, min_size=1, max_size=3).map(tuple))

# Corruptions that leave the root FDT's header and compatible intact: the next kernel accepts.
ACCEPT_KINDS = {"mapval", "chunk_next", "chunk_order", "chunk_num", "elm_bitmap", "elm_start",
                "bitmap_fill", "sub_hdr", "sub_bytes", "mapname", "maplen"}


def apply(base, muts):
    """Corrupt the base machine's memory; returns what an oracle can say about the result."""
    m = base["m"]
    mem, fdt = m.mem, m.kho_out.fdt_page
    chunks = base["chunks"]
    bits_bytes = m.profile.preserve_bits // 8
    for mut in muts:
        kind = mut[0]
        if kind == "hdr":
            mem.write(fdt + 4 * mut[1], struct.pack(">I", mut[2]))
        elif kind == "bytes":
            mem.write(fdt + mut[1], mut[2])
        elif kind == "compat":
            mem.write(fdt + base["compat_off"], mut[1])
        elif kind == "mapval":
            v = mut[1]
            if isinstance(v, str):
                v = {"self": fdt, "chunk0": chunks[0] if chunks else 0,
                     "chunk0+8": (chunks[0] + 8) if chunks else 8, "fdt": fdt}[v]
            mem.write(fdt + base["map_off"], struct.pack("<Q", v))
        elif kind == "maplen":
            mem.write(fdt + base["map_off"] - 8, struct.pack(">I", mut[1]))
        elif kind == "mapname":
            mem.write(fdt + base["map_off"] - 4, struct.pack(">I", mut[1]))
        elif kind == "trunc":
            mem.write(fdt + mut[1], bytes(sup.PAGE - mut[1]))
        elif kind == "garbage":
            mem.write(fdt, random.Random(mut[1]).randbytes(sup.PAGE) if mut[1] else bytes(sup.PAGE))
        elif kind.startswith("chunk_") or kind in ("elm_bitmap", "elm_start", "bitmap_fill"):
            if not chunks:
                continue
            i = mut[1] % len(chunks)
            c = chunks[i]
            if kind == "chunk_next":
                t = mut[2]
                if isinstance(t, str):
                    t = {"self": c, "first": chunks[0], "prev": chunks[max(0, i - 1)], "zero": 0,
                         "unaligned": c + 8, "beyond": mem.size, "fdt": fdt}[t]
                mem.write(c, struct.pack("<Q", t))
            elif kind == "chunk_order":
                mem.write(c + 8, struct.pack("<I", mut[2]))
            elif kind == "chunk_num":
                mem.write(c + 12, struct.pack("<I", mut[2]))
            else:
                num = struct.unpack_from("<I", mem.read(c + 12, 4))[0]
                e = c + 16 + 16 * (mut[2] % max(1, min(num, 255)))
                if kind == "elm_start":
                    mem.write(e, struct.pack("<Q", mut[3]))
                elif kind == "elm_bitmap":
                    old = struct.unpack("<Q", mem.read(e + 8, 8))[0]
                    t = mut[3]
                    if isinstance(t, str):
                        t = {"beyond": mem.size, "edge": mem.size - bits_bytes + 1, "fdt": fdt,
                             "chunk": c, "unaligned": old + 8, "max": (1 << 64) - 1}[t]
                    mem.write(e + 8, struct.pack("<Q", t))
                else:
                    bm = struct.unpack("<Q", mem.read(e + 8, 8))[0]
                    if bm + bits_bytes <= mem.size:
                        mem.write(bm, mut[3] * bits_bytes)
        elif kind in ("sub_hdr", "sub_bytes"):
            s = base["subs"][mut[1] % len(base["subs"])] if base["subs"] else None
            if s is None:
                continue
            if kind == "sub_hdr":
                mem.write(s + 4 * mut[2], struct.pack(">I", mut[3]))
            else:
                mem.write(s + mut[2], mut[3])
    page = mem.read(fdt, sup.PAGE)
    plen, nameoff = struct.unpack_from(">II", page, base["map_off"] - 8)
    bitmaps_broken = plen != 8 or nameoff != base["map_nameoff"]
    kinds = {("hdr7" if mu[0] == "hdr" and mu[1] == 7 else mu[0]) for mu in muts}
    return page, kinds, bitmaps_broken


def predict(page, kinds, bitmaps_broken):
    """(accepted?, a log fragment that must appear) or None when no simple oracle applies."""
    verdict = sup.fdt_check_header_oracle(page)
    if verdict:
        return False, f"is invalid: {verdict}"
    if kinds == {"compat"} or kinds == {"compat", "hdr7"}:
        if sup.stringlist_contains(page[COMPAT_AT[0]:COMPAT_AT[0] + 7], b"kho-v1"):
            return True, ACCEPTED
        return False, "is incompatible with 'kho-v1': 1"
    if kinds <= ACCEPT_KINDS | {"hdr7"}:
        return True, BITMAPS_MSG if bitmaps_broken else ACCEPTED
    return None


COMPAT_AT = [0]


def read_tree(tree):
    """Read every file of a debugfs tree; returns {path: bytes or 'KernelError ...'}."""
    out = {}
    stack = [(tree.root, "")]
    while stack:
        d, path = stack.pop()
        for c in tree.listdir(d):
            p = f"{path}/{c.name}"
            if c.is_dir():
                stack.append((c, p))
                continue
            try:
                h = c.open()
                size = c.content_size()
                data = h.read(0, min(size, 1 << 16))
                if size > 1 << 16:
                    h.read(size - 4096, 4096)
                out[p] = data
            except KernelError as e:
                out[p] = f"KernelError {e}"
    return out


def run_case(base, muts):
    problems = []
    page, kinds, broken = apply(base, muts)
    COMPAT_AT[0] = base["compat_off"]
    expect = predict(page, kinds, broken)
    m = base["m"]
    m.kexec_load(release="rel-next")
    ho = m.kexec_exec()
    m2 = Machine(ho.cmdline, MachineConfig(**ho.config), ho, release=ho.release)
    dmesg = [line.text for line in m2.dmesg]
    accepted = m2.kho_in is not None
    has_acc = ACCEPTED in dmesg
    has_off = any(t.startswith(REVIVAL_OFF) for t in dmesg)
    has_reason = any(r in t for t in dmesg for r in REASONS)
    if accepted and not (has_acc and not has_off):
        problems.append(f"accepted without the kernel's lines: {dmesg}")
    if not accepted and not (has_off and has_reason and not has_acc):
        problems.append(f"rejected without the kernel's lines: {dmesg}")
    if expect is not None:
        want_acc, fragment = expect
        if accepted != want_acc:
            problems.append(f"{'accepted' if accepted else 'rejected'}, kernel would "
                            f"{'accept' if want_acc else 'reject'} ({fragment}); log: {dmesg}")
        elif not any(fragment in t for t in dmesg):
            problems.append(f"log lacks {fragment!r}: {dmesg}")
    tree = Tree(m2)
    files = read_tree(tree)
    if m2.kho_out is None:
        # The map preserved all free memory: kho_init finds no page for its root FDT.
        if not (accepted and NO_ROOT_FDT in dmesg and not files):
            problems.append(f"KHO disabled without cause or with files left: {dmesg} {sorted(files)}")
        json.dumps(m2.status())
        return {"problems": problems, "accepted": accepted, "predicted": expect is not None}
    if ("/kho/in/fdt" in files) != accepted:
        problems.append(f"kho/in/fdt {'missing' if accepted else 'present'} "
                        f"although the handover was {'accepted' if accepted else 'rejected'}")
    # Unless a corrupted map left the FDT page unpreserved (then the next kernel may reuse it),
    # in/fdt shows exactly the bytes handed over.
    total = struct.unpack_from(">I", page, 4)[0]
    fdt = m.kho_out.fdt_page
    if accepted and total <= sup.PAGE and m2.preserved.contains(fdt, fdt + sup.PAGE) \
            and files.get("/kho/in/fdt") != page[:total]:
        problems.append("kho/in/fdt is not the handed-over FDT")
    json.dumps(m2.status())
    try:
        m2.kho_out.set_finalize(1)
    except KernelError as e:
        if e.errno != errno.ENOMEM:         # memory the corrupted map preserved is not free
            problems.append(f"the next kernel cannot finalize: {e}")
    return {"problems": problems, "accepted": accepted, "predicted": expect is not None}


def describe(item):
    b, muts = item
    return f"base {BASE_KINDS[b]}: {muts!r}"


def test_handover_corruption_in_process():
    bases = [build_base(k) for k in BASE_KINDS]
    for i in range(len(bases)):              # the uncorrupted round trip is accepted
        res = run_case_in_child(bases, (i, ()))
        assert res == {"problems": [], "accepted": True, "predicted": True}, res
    cases = sup.load_corpus("handover_corruptions.txt")
    seen = {repr(c) for c in cases}
    cases += [c for c in sup.collect_examples(example, 800, seed=0x6B686F32) if repr(c) not in seen]
    results = sup.run_isolated(cases, lambda it: run_case(bases[it[0]], it[1]),
                               timeout=2.5, parallel=2)
    failures = []
    outcome = {"accepted": 0, "rejected": 0, "predicted": 0}
    for item, res in zip(cases, results):
        if res["status"] != "ok":
            failures.append(f"{describe(item)}: {res['status']}: {res.get('error')}"
                            + (f"\n      {res['tb'].strip().splitlines()[-3:]}" if "tb" in res else ""))
            continue
        r = res["result"]
        outcome["accepted" if r["accepted"] else "rejected"] += 1
        outcome["predicted"] += r["predicted"]
        if r["problems"]:
            failures.append(f"{describe(item)}: " + "; ".join(r["problems"]))
    print(f"\nhandover corruptions: {outcome['accepted']} accepted, {outcome['rejected']} rejected, "
          f"{outcome['predicted']} with an exact expected outcome")
    sup.check_family("handover corruptions (in-process)", len(cases), failures)


def run_case_in_child(bases, item):
    res = sup.run_isolated([item], lambda it: run_case(bases[it[0]], it[1]), timeout=30)[0]
    return res["result"] if res["status"] == "ok" else res


# -- a handful through a real mount ----------------------------------------------------------
def _fdt_layout(blob):
    f = libfdt.Fdt(bytearray(blob))
    props = {}
    off = f.first_property_offset(0)
    while off >= 0:
        p = f.get_property_by_offset(off)
        props[p.name] = (f.off_dt_struct() + off + 12, bytes(p))
        off = f.next_property_offset(off, (libfdt.NOTFOUND,))
    return props


def _pwrite(path, data, off):
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, off) == len(data)
    finally:
        os.close(fd)


MOUNT_CASES = [
    # (name, how, expected accepted (None = either), log fragment that must appear)
    ("bad magic", ("fdt", 0, b"\xd0\x0d\xfe\xee"), False, "is invalid: -9"),
    ("last_comp_version 18", ("fdt", 24, struct.pack(">I", 18)), False, "is invalid: -10"),
    ("totalsize 16", ("fdt", 4, struct.pack(">I", 16)), False, "is invalid: -8"),
    ("compatible kho-v9", ("compat", b"kho-v9"), False, "is incompatible with 'kho-v1': 1"),
    ("map property length 4", ("maplen", 4), True, BITMAPS_MSG),
    ("chunk num_elms 1000", ("chunk", 12, struct.pack("<I", 1000)), True, ACCEPTED),
    ("chunk order 200", ("chunk", 8, struct.pack("<I", 200)), True, ACCEPTED),
    ("bitmap pointer past memory", ("chunk", 24, struct.pack("<Q", 1 << 40)), True, ACCEPTED),
    ("bitmap phys_start past memory", ("chunk", 16, struct.pack("<Q", 1 << 50)), True, ACCEPTED),
    ("header points off the page", ("fdt", 4, struct.pack(">II", 0x7FFFFFFF, 0x7FF00000)),
     None, None),
    ("memblock sub-FDT points off its page",
     ("sub", 4, struct.pack(">II", 0x7FFFFFFF, 0x7FF00000)), True, ACCEPTED),
]


@pytest.mark.fuse
def test_handover_corruption_through_mount(mounter):
    args = ("--cmdline", "kho=on reserve_mem=1M:4096:oops", "--memory", "1G")
    mnt = mounter.mount(*args)
    from khofs import runtime
    log_path = runtime.paths(mnt)["log"]
    failures = []
    for name, how, want_acc, fragment in MOUNT_CASES:
        if sup.khofs("status", mnt, timeout=30).returncode != 0:
            sup.khofs("umount", mnt, timeout=40)
            mounter.mount(*args, at=mnt)
        log_start = os.path.getsize(log_path)
        out = f"{mnt}/kho/out"
        if sup.read_file(f"{out}/finalize") == b"1\n":      # a failed kexec stays in this boot
            sup.write_file(f"{out}/finalize", b"0\n")
        sup.write_file(f"{out}/finalize", b"1\n")
        blob = sup.read_file(f"{out}/fdt")
        props = _fdt_layout(blob)
        chunk = int.from_bytes(props["preserved-memory-map"][1], "little")
        kind = how[0]
        if kind == "fdt":
            _pwrite(f"{out}/fdt", how[2], how[1])
        elif kind == "sub":
            _pwrite(f"{out}/sub_fdts/memblock", how[2], how[1])
        elif kind == "compat":
            _pwrite(f"{out}/fdt", how[1], props["compatible"][0])
        elif kind == "maplen":
            _pwrite(f"{out}/fdt", struct.pack(">I", how[1]), props["preserved-memory-map"][0] - 8)
        elif kind == "chunk":
            r = sup.khofs("ctl", mnt, "mem", "write", hex(chunk + how[1]), "-", input=how[2])
            assert r.returncode == 0, r.stderr
        corrupted = sup.read_file(f"{out}/fdt")
        r = sup.khofs("kexec", mnt, "--release", "rel-next", timeout=120)
        problems = []
        if r.returncode != 0:
            problems.append(f"khofs kexec exited {r.returncode}: {r.stderr.decode(errors='replace').strip()}")
        st = sup.khofs("status", mnt, "--json", timeout=30)
        if st.returncode != 0:
            problems.append(f"the daemon no longer answers: {st.stderr.decode(errors='replace').strip()}")
        else:
            status = json.loads(st.stdout)
            log = sup.khofs("ctl", mnt, "log", timeout=30).stdout.decode()
            if status["kexec_count"] < 1:
                problems.append("no kexec happened")
            accepted = status["kho_in"]
            if want_acc is not None and accepted != want_acc:
                problems.append(f"{'accepted' if accepted else 'rejected'}, expected the other; log:\n{log}")
            if fragment and fragment not in log:
                problems.append(f"log lacks {fragment!r}:\n{log}")
            if accepted != (ACCEPTED in log) or (not accepted) != (REVIVAL_OFF in log):
                problems.append(f"log does not say what happened:\n{log}")
            if os.path.isdir(f"{mnt}/kho/in") != accepted:
                problems.append("kho/in does not match the outcome")
            for root, _dirs, names in os.walk(f"{mnt}/kho"):
                for n in names:
                    try:
                        data = sup.read_file(os.path.join(root, n))
                    except OSError as e:
                        if e.errno != errno.EFAULT or "runs past the end of memory" not in log:
                            problems.append(f"reading {root}/{n}: {e}")
                        continue
                    total = struct.unpack_from(">I", corrupted, 4)[0]
                    intact = "failed to restore folio for KHO fdt" not in log
                    if root.endswith("kho/in") and n == "fdt" and total <= 4096 and intact \
                            and data != corrupted[:total]:
                        problems.append("kho/in/fdt differs from the corrupted out/fdt")
        with open(log_path, "rb") as f:
            f.seek(log_start)
            daemon_log = f.read().decode(errors="replace")
        if "Traceback" in daemon_log or "internal error" in daemon_log:
            problems.append("the daemon logged a traceback:\n" + daemon_log[-1500:])
        if problems:
            failures.append(f"{name}: " + "; ".join(problems))
    sup.report_family("handover corruptions (mount)", len(MOUNT_CASES), failures)
    assert not failures, "\n".join(failures)
