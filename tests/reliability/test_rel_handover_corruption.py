"""Bad input, family (b): corrupted handovers (root FDT, memory-map chunks, bitmaps, sub-FDTs;
in 7.1 the kho-v3 children's blob-size / preserved-data, the radix tree and kexec-metadata).

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
BITMAPS_MSG = "KHO: failed to get preserved memory bitmaps"
NO_ROOT_FDT = "khofs: kho_init: no free page for the root FDT (-ENOMEM), KHO disabled"
REASONS = ("is invalid: ", "is incompatible with 'kho-v1': ", "failed to memremap")
# 7.1: a tree pointer that is not a page of memory (or a page reached twice) would fault in
# the kernel's walk; khofs says so and boots as if cold (docs/abi-profiles.md).
WALK_BROKEN = "khofs: the preserved-memory tree is broken"
PAST_MEMORY = "runs past the end of memory"
MAP_ERROR = {"7.0": BITMAPS_MSG, "7.1": "KHO: failed to get preserved memory map",
             "7.2": "KHO: failed to get preserved memory map",
             "7.4": "KHO: failed to get preserved memory map"}
GiB = 1 << 30


# -- the machines whose handover gets corrupted -------------------------------------------
def build_base(kind):
    """A finalized machine (7.1: a booted one) with memblock, preserved pages and a folio, and
    a user subtree; a "chain" kind has more than 255 order-0 bitmaps instead: a chunk chain."""
    abi = {"chain": "6.18", "7.0-chain": "7.0"}.get(kind, kind)
    if kind.endswith("chain"):
        m = Machine("kho=on", MachineConfig(memory=64 * GiB, abi=abi))
        for k in range(300):
            m.kho_out.preserve_pages(k * (128 << 20) + sup.PAGE, sup.PAGE)
    else:
        m = Machine("kho=on reserve_mem=1M:4096:oops", MachineConfig(memory=GiB, abi=abi))
        kho = m.kho_out
        p = m.pages.alloc_range(64)
        m.mem.write(p, bytes(range(256)) * 64)
        kho.preserve_pages(p + 3 * sup.PAGE, 5 * sup.PAGE)
        f = m.pages.alloc_pages(4)
        kho.preserve_folio(f, 4)
        if abi in ("6.16", "6.18"):
            kho.register_notifier(UserSubtree(kho, "relsub", sup.small_dtb("rel-v1", {"n": 7})))
        else:
            # 6.19+: the subtree goes in at registration; kho-v3 takes any blob, not only FDTs.
            blob = sup.small_dtb("rel-v1", {"n": 7}) if abi == "7.0" else b"rel-v3 any blob " * 9
            UserSubtree(kho, "relsub", blob).init_subtree(kho)
    kho = m.kho_out
    if abi not in sup.RADIX_PROFILES:                        # 7.1 has nothing to finalize
        kho.set_finalize(1)
    page = m.mem.read(kho.fdt_page, sup.PAGE)
    props = sup.root_props(page)
    map_off = props["preserved-memory-map"][0]
    base = {"m": m, "kind": kind, "page": page, "compat_off": props["compatible"][0],
            "map_off": map_off, "map_nameoff": struct.unpack_from(">I", page, map_off - 4)[0],
            "chunks": list(kho.map_chunks),
            "subs": [b.phys for d, b in kho.fdt_list if d == "sub_fdts"]}
    if abi in sup.RADIX_PROFILES:
        base["children"] = list(sup.child_props(page).items())
        base["meta"] = int.from_bytes(sup.subnodes(page)["kexec-metadata"]["preserved-data"],
                                      "little")
        base["tables"], base["leaves"] = radix_layout(m.mem.read, int.from_bytes(
            props["preserved-memory-map"][1], "little"))
    return base


def radix_layout(read, root):
    """The 7.1 tree as KHO-SPEC §9 lays it out: ([(level, table phys, live entry indices,
    parent phys)], [leaf phys]); the root is the level-5 table (its own parent here), level-1
    entries point at leaves."""
    tables, leaves = [], []

    def walk(phys, level, parent):
        entries = struct.unpack("<512Q", read(phys, sup.PAGE))
        live = [i for i, e in enumerate(entries) if e]
        tables.append((level, phys, live, parent))
        for i in live:
            if level == 1:
                leaves.append(entries[i])
            else:
                walk(entries[i], level - 1, phys)

    walk(root, 5, root)
    return tables, leaves


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

HDR = st.tuples(st.just("hdr"), st.integers(0, 9), U32)
BYTES = st.tuples(st.just("bytes"), st.integers(0, 300), st.binary(min_size=1, max_size=16))
MAPLEN = st.tuples(st.just("maplen"), U32)
MAPNAME = st.tuples(st.just("mapname"), U32)
TRUNC = st.tuples(st.just("trunc"), st.integers(0, 300))
GARBAGE = st.tuples(st.just("garbage"), st.integers(0, 1 << 32))

mutation = st.one_of(
    HDR,
    BYTES,
    st.tuples(st.just("compat"), st.one_of(
        st.sampled_from([b"kho-v1", b"kho-v2", b"KHO-V1", b"kho-v0", b"kho\0v1", b"\0" * 6,
                         b"1v-ohk", b"kho-v\0"]),
        st.binary(min_size=6, max_size=6))),
    st.tuples(st.just("mapval"), st.one_of(U64, st.sampled_from(["self", "chunk0", "chunk0+8",
                                                                  "fdt"]))),
    MAPLEN,
    MAPNAME,
    TRUNC,
    GARBAGE,
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

# 7.0 has 6.18's chunk list and kho-v1, so the same corruptions apply.
BASE_KINDS_70 = ["7.0", "7.0", "7.0-chain"]
example_70 = st.tuples(st.integers(0, len(BASE_KINDS_70) - 1),
                       st.lists(mutation, min_size=1, max_size=3).map(tuple))

# 7.1: the kho-v3 root, its children's preserved-data / blob-size, the radix tree's tables and
# leaves, and the kexec-metadata blob.
RADIX_TARGET = st.one_of(st.sampled_from(["zero", "beyond", "unaligned", "self", "root", "leaf",
                                          "fdt", "parent"]), U64)
BLOB_SIZE = st.one_of(st.sampled_from([0, 1, 3, 4, 72, 73, 74, 4096, 1 << 20, GiB, 1 << 40,
                                       (1 << 64) - 1]), U64)
CHILD_PHYS = st.one_of(st.sampled_from(["zero", "beyond", "fdt", "other", "unaligned"]), U64)
mutation_71 = st.one_of(
    HDR, BYTES, MAPLEN, MAPNAME, TRUNC, GARBAGE,
    st.tuples(st.just("compat"), st.one_of(
        st.sampled_from([b"kho-v3", b"kho-v1", b"kho-v2", b"kho-v4", b"KHO-V3", b"kho\0v3",
                         b"\0" * 6, b"kho-v\0"]),
        st.binary(min_size=6, max_size=6))),
    st.tuples(st.just("mapval"), st.one_of(U64, st.sampled_from(["self", "fdt", "leaf0", "node0",
                                                                  "root+8", "zero"]))),
    st.tuples(st.just("rdx_entry"), SEL, SEL, RADIX_TARGET),
    st.tuples(st.just("rdx_free"), SEL, st.integers(0, 511), RADIX_TARGET),
    st.tuples(st.just("rdx_fill"), SEL, st.sampled_from([b"\xff", b"\x55", b"\x01", b"\x80"])),
    st.tuples(st.just("rdx_bit"), SEL, st.integers(0, (1 << 15) - 1)),
    st.tuples(st.just("rdx_garbage"), SEL, st.integers(0, 1 << 32)),
    st.tuples(st.just("child_val"), SEL, st.just("blob-size"), BLOB_SIZE),
    st.tuples(st.just("child_val"), SEL, st.just("preserved-data"), CHILD_PHYS),
    st.tuples(st.just("child_len"), SEL, st.sampled_from(["blob-size", "preserved-data"]), U32),
    st.tuples(st.just("child_name"), SEL, st.sampled_from(["blob-size", "preserved-data"]), U32),
    st.tuples(st.just("meta_version"), U32),
    st.tuples(st.just("meta_count"), U32),
    st.tuples(st.just("meta_release"), st.integers(0, 64), st.binary(min_size=1, max_size=16)),
)
BASE_KINDS_71 = ["7.1"]
example_71 = st.tuples(st.just(0), st.lists(mutation_71, min_size=1, max_size=3).map(tuple))

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
                     "chunk0+8": (chunks[0] + 8) if chunks else 8, "fdt": fdt,
                     **radix_specials(base)}[v]
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
        elif kind.startswith(("rdx_", "child_", "meta_")):
            apply_71(base, mut)
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


def radix_specials(base):
    if "tables" not in base:
        return {}
    root = base["tables"][0][1]
    return {"leaf0": base["leaves"][0], "node0": base["tables"][1][1], "root+8": root + 8,
            "zero": 0}


def apply_71(base, mut):
    """The 7.1 corruptions: radix tables and leaves, the children's properties, the metadata."""
    m = base["m"]
    mem, fdt = m.mem, m.kho_out.fdt_page
    kind = mut[0]
    tables, leaves = base.get("tables", []), base.get("leaves", [])
    if kind in ("rdx_entry", "rdx_free", "rdx_garbage"):
        _, table, live, parent = tables[mut[1] % len(tables)]
        if kind == "rdx_garbage":
            mem.write(table, random.Random(mut[2]).randbytes(sup.PAGE))
            return
        i = live[mut[2] % len(live)] if kind == "rdx_entry" else mut[2]
        old = struct.unpack("<Q", mem.read(table + 8 * i, 8))[0]
        t = mut[3]
        if isinstance(t, str):
            t = {"zero": 0, "beyond": mem.size, "unaligned": old + 8, "self": table,
                 "root": tables[0][1], "leaf": leaves[0], "fdt": fdt, "parent": parent}[t]
        mem.write(table + 8 * i, struct.pack("<Q", t))
    elif kind == "rdx_fill":
        mem.write(leaves[mut[1] % len(leaves)], mut[2] * sup.PAGE)
    elif kind == "rdx_bit":
        at = leaves[mut[1] % len(leaves)] + mut[2] // 8
        mem.write(at, bytes([mem.read(at, 1)[0] ^ (1 << (mut[2] % 8))]))
    elif kind.startswith("child_"):
        children = base["children"]
        _, props = children[mut[1] % len(children)]
        at = fdt + props[mut[2]][0]
        if kind == "child_len":
            mem.write(at - 8, struct.pack(">I", mut[3]))
        elif kind == "child_name":
            mem.write(at - 4, struct.pack(">I", mut[3]))
        else:
            v = mut[3]
            if isinstance(v, str):
                old = struct.unpack("<Q", mem.read(at, 8))[0]
                other = children[(mut[1] + 1) % len(children)][1]["preserved-data"][1]
                v = {"zero": 0, "beyond": mem.size, "fdt": fdt, "unaligned": old + 8,
                     "other": int.from_bytes(other, "little")}[v]
            mem.write(at, struct.pack("<Q", v))
    elif kind == "meta_version":
        mem.write(base["meta"], struct.pack("<I", mut[1]))
    elif kind == "meta_count":
        mem.write(base["meta"] + 69, struct.pack("<I", mut[1]))
    elif kind == "meta_release":
        mem.write(base["meta"] + 4 + mut[1], mut[2][:65 - mut[1]])


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
    m = base["m"]
    abi = m.profile.name
    COMPAT_AT[0] = base["compat_off"]
    if abi in ("6.16", "6.18"):
        expect, reasons, found, map0 = predict(page, kinds, broken), REASONS, ACCEPTED, False
    else:
        expect = predict_7x(base, page, kinds, broken)
        compat = sup.COMPATIBLE[abi]
        reasons = ("is invalid: ", f"is incompatible with '{compat}': ", "failed to memremap",
                   MAP_ERROR[abi])
        found = sup.FOUND_LINE[abi]
        map0 = not broken and page[base["map_off"]:base["map_off"] + 8] == bytes(8)
    meta = expected_metadata(base, page) if abi in sup.RADIX_PROFILES else None
    m.kexec_load(release="rel-next")
    ho = m.kexec_exec()
    m2 = Machine(ho.cmdline, MachineConfig(**ho.config), ho, release=ho.release)
    dmesg = [line.text for line in m2.dmesg]
    accepted = m2.kho_in is not None
    has_acc = found in dmesg
    off_line = sup.revival_off_line(abi)
    has_off = any(t == off_line if abi in sup.RADIX_PROFILES else t.startswith(off_line)
                  for t in dmesg)
    has_reason = any(r in t for t in dmesg for r in reasons)
    walk_broken = abi in sup.RADIX_PROFILES and any(t.startswith(WALK_BROKEN) for t in dmesg)
    if accepted and not (has_acc and not has_off):
        problems.append(f"accepted without the kernel's lines: {dmesg}")
    if not accepted and not (has_off and (has_reason or map0) and not has_acc) \
            and not (walk_broken and has_acc and not has_off):
        problems.append(f"rejected without the kernel's lines: {dmesg}")
    if expect is not None:
        want_acc, fragment, *settled = expect
        # 7.1: kho_populate accepts before the radix walk that a broken tree would fault.
        got = accepted if settled in ([], [True]) else has_acc
        if got != want_acc:
            problems.append(f"{'accepted' if got else 'rejected'}, kernel would "
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
    intact = accepted and total <= sup.PAGE and m2.preserved.contains(fdt, fdt + sup.PAGE)
    if intact and files.get("/kho/in/fdt") != page[:total]:
        problems.append("kho/in/fdt is not the handed-over FDT")
    # Every file reads; past the end of memory only where khofs said so, or in an in/fdt whose
    # header runs past it (the kernel would fault there; khofs gives EFAULT without a line).
    said = any(PAST_MEMORY in t for t in dmesg)
    for p, data in files.items():
        past = p == "/kho/in/fdt" and fdt + total > m2.mem.size
        if isinstance(data, str) and not ("EFAULT" in data and (said or past)):
            problems.append(f"{p}: {data}")
    json.dumps(m2.status())
    if abi in sup.RADIX_PROFILES:
        problems += check_71(page, kinds, meta, m2, tree, dmesg, intact)
        try:
            UserSubtree(m2.kho_out, "after", b"added after the handover").init_subtree(m2.kho_out)
        except KernelError as e:
            if e.errno != errno.ENOMEM:
                problems.append(f"the next kernel cannot add a subtree: {e}")
        return {"problems": problems, "accepted": accepted, "predicted": expect is not None}
    try:
        m2.kho_out.set_finalize(1)
    except KernelError as e:
        if e.errno != errno.ENOMEM:         # memory the corrupted map preserved is not free
            problems.append(f"the next kernel cannot finalize: {e}")
    return {"problems": problems, "accepted": accepted, "predicted": expect is not None}


# -- 7.0 / 7.1 oracles ---------------------------------------------------------------------
# Corruptions that leave the root's header, compatible and map property in place.
ROOT_KEEP_70 = ACCEPT_KINDS | {"hdr7"}
CHILD_KINDS_71 = {"child_val", "child_len", "child_name", "meta_version", "meta_count",
                  "meta_release"}
TREE_KINDS_71 = {"mapval", "rdx_entry", "rdx_free", "rdx_garbage"}   # the walk may fault
ROOT_KEEP_71 = CHILD_KINDS_71 | TREE_KINDS_71 | {"rdx_fill", "rdx_bit", "mapname", "maplen",
                                                 "hdr7"}


def predict_7x(base, page, kinds, map_broken):
    """(kho_populate accepts?, a log fragment that must appear, whether that settles the boot)
    or None. 6.19+ reads the map address in kho_populate: a missing one logs its error, and it
    or a 0 address is -ENOENT (kho-abi-notes §3.3; 7.1 prints no number)."""
    abi = base["m"].profile.name
    verdict = sup.fdt_check_header_oracle(page)
    if verdict:
        return False, f"is invalid: {verdict}", True
    keep = ROOT_KEEP_70 if abi == "7.0" else ROOT_KEEP_71
    if not kinds <= keep | {"compat"}:
        return None
    compat = sup.COMPATIBLE[abi]
    at = base["compat_off"]
    if "compat" in kinds and not sup.stringlist_contains(page[at:at + len(compat) + 1],
                                                         compat.encode()):
        return False, f"is incompatible with '{compat}': 1", True
    if map_broken:
        return False, MAP_ERROR[abi], True
    if page[base["map_off"]:base["map_off"] + 8] == bytes(8):
        return False, sup.revival_off_line(abi, -errno.ENOENT), True
    return True, sup.FOUND_LINE[abi], not (abi in sup.RADIX_PROFILES and kinds & TREE_KINDS_71)


def _fdt(page):
    return libfdt.Fdt(bytearray(page[:struct.unpack_from(">I", page, 4)[0]]))


def _getprop(f, node, name):
    """fdt_getprop: the value, or None for any error (the kernel gets NULL)."""
    try:
        v = f.getprop(node, name, (libfdt.NOTFOUND,))
    except libfdt.FdtException:
        return None
    return None if isinstance(v, int) else bytes(v)


def expected_in_subs(page):
    """{name: size} of in/sub_fdts as 7.1's kho_in_debugfs_init makes them: children in
    fdt_for_each_subnode order (which stops at the first error), each needing an 8-byte
    preserved-data and an 8-byte blob-size, the file's size being blob-size."""
    f = _fdt(page)
    out = {}
    try:
        node = f.first_subnode(0, (libfdt.NOTFOUND,))
        while node >= 0:
            pd, bs = _getprop(f, node, "preserved-data"), _getprop(f, node, "blob-size")
            if pd is not None and len(pd) == 8 and bs is not None and len(bs) == 8:
                out[f.get_name(node)] = int.from_bytes(bs, "little")
            node = f.next_subnode(node, (libfdt.NOTFOUND,))
    except libfdt.FdtException:
        pass
    return out


def expected_metadata(base, page):
    """(the line kho_in_kexec_metadata logs or None for none, the count it takes or None), from
    the corrupted FDT and blob (kho-abi-notes §5.4); None when the FDT is not one the kernel
    takes or the blob moved elsewhere."""
    if sup.fdt_check_header_oracle(page):
        return None
    f = _fdt(page)
    try:
        node = f.subnode_offset(0, "kexec-metadata", (libfdt.NOTFOUND,))
    except libfdt.FdtException:
        node = -1
    if node < 0:
        return None, None
    pd, bs = _getprop(f, node, "preserved-data"), _getprop(f, node, "blob-size")
    if pd is None or len(pd) != 8:
        return None, None
    if bs is None or len(bs) != 8:
        return ("KHO: broken KHO subnode 'kexec-metadata': missing or invalid blob-size "
                "property"), None
    if int.from_bytes(pd, "little") != base["meta"]:
        return None
    size = int.from_bytes(bs, "little")
    data = base["m"].mem.read(base["meta"], 73)
    version, release, count = struct.unpack("<I65sI", data)
    if size < 4:
        return f"KHO: kexec-metadata blob too small ({size} bytes)", None
    if version != 1:
        return f"KHO: kexec-metadata version {version} not supported (expected 1)", None
    if size < 73:
        return f"KHO: kexec-metadata blob too small for v1 ({size} < 73)", None
    release = release[:64].split(b"\0")[0].decode(errors="replace")
    return f"KHO: exec from: {release} (count {count})", count


META_LINES = ("KHO: exec from: ", "KHO: kexec-metadata ",
              "KHO: broken KHO subnode 'kexec-metadata'")


def check_71(page, kinds, meta, m2, tree, dmesg, intact):
    """The 7.1 successor: its in/sub_fdts and metadata lines where the corruption only touched
    children or the metadata, and always an outgoing kexec-metadata of count incoming + 1."""
    problems = []
    execs = [t for t in dmesg if t.startswith("KHO: exec from: ")]
    if intact and kinds <= CHILD_KINDS_71 | {"hdr7"}:
        want = expected_in_subs(page)
        got = {c.name: c.content_size() for c in tree.listdir(tree.resolve("kho/in/sub_fdts"))}
        if got != want:
            problems.append(f"in/sub_fdts is {got}, the kernel makes {want}")
        if meta is not None:
            line, _ = meta
            said = [t for t in dmesg if t.startswith(META_LINES)]
            if line is None and said:
                problems.append(f"metadata lines where the kernel is silent: {said}")
            if line is not None and line not in dmesg:
                problems.append(f"log lacks {line!r}: {dmesg}")
    if m2.kho_in is None and execs:
        problems.append(f"metadata read from a handover that was not taken: {execs}")
    count = int(execs[-1].rsplit("(count ", 1)[1][:-1]) if execs else 0
    want = struct.pack("<I65sI", 1, b"rel-next", (count + 1) & 0xFFFFFFFF)
    blob = tree.resolve("kho/out/sub_fdts/kexec-metadata")
    if blob.open().read(0, 100) != want:
        problems.append(f"out kexec-metadata is not (1, rel-next, {count + 1})")
    return problems


# group -> (bases, generated cases, corpus file, how many to draw, seed)
GROUPS = {
    "6.16/6.18": (BASE_KINDS, example, "handover_corruptions.txt", 800, 0x6B686F32),
    "7.0": (BASE_KINDS_70, example_70, "handover_corruptions_70.txt", 600, 0x6B686F70),
    "7.1": (BASE_KINDS_71, example_71, "handover_corruptions_71.txt", 600, 0x6B686F71),
    # kho-v4 (7.2) and boot memory (7.4): 7.1's corruptions against their own bases
    "7.2": (["7.2"], example_71, "handover_corruptions_71.txt", 600, 0x6B686F72),
    "7.4": (["7.4"], example_71, "handover_corruptions_71.txt", 600, 0x6B686F74),
}


@pytest.mark.parametrize("group", list(GROUPS))
def test_handover_corruption_in_process(group):
    kinds, strategy, corpus, n, seed = GROUPS[group]
    bases = [build_base(k) for k in kinds]
    for i in range(len(bases)):              # the uncorrupted round trip is accepted
        res = run_case_in_child(bases, (i, ()))
        assert res == {"problems": [], "accepted": True, "predicted": True}, res
    cases = sup.load_corpus(corpus)
    seen = {repr(c) for c in cases}
    cases += [c for c in sup.collect_examples(strategy, n, seed=seed) if repr(c) not in seen]
    results = sup.run_isolated(cases, lambda it: run_case(bases[it[0]], it[1]),
                               timeout=2.5, parallel=2)
    failures = []
    outcome = {"accepted": 0, "rejected": 0, "predicted": 0}
    for (b, muts), res in zip(cases, results):
        what = f"base {kinds[b]}: {muts!r}"
        if res["status"] != "ok":
            failures.append(f"{what}: {res['status']}: {res.get('error')}"
                            + (f"\n      {res['tb'].strip().splitlines()[-3:]}" if "tb" in res else ""))
            continue
        r = res["result"]
        outcome["accepted" if r["accepted"] else "rejected"] += 1
        outcome["predicted"] += r["predicted"]
        if r["problems"]:
            failures.append(f"{what}: " + "; ".join(r["problems"]))
    print(f"\nhandover corruptions [{group}]: {outcome['accepted']} accepted, "
          f"{outcome['rejected']} rejected, {outcome['predicted']} with an exact expected outcome")
    sup.check_family(f"handover corruptions (in-process) [{group}]", len(cases), failures)


def run_case_in_child(bases, item):
    res = sup.run_isolated([item], lambda it: run_case(bases[it[0]], it[1]), timeout=30)[0]
    return res["result"] if res["status"] == "ok" else res


# -- a handful through a real mount ----------------------------------------------------------
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
        props = sup.root_props(blob)
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
        problems = _kexec_and_judge(mnt, "6.18", log_path, log_start, corrupted, want_acc,
                                    fragment)
        if problems:
            failures.append(f"{name}: " + "; ".join(problems))
    sup.report_family("handover corruptions (mount)", len(MOUNT_CASES), failures)
    assert not failures, "\n".join(failures)


def _kexec_and_judge(mnt, abi, log_path, log_start, corrupted, want_acc, fragment):
    """kexec the mount and judge the next boot: the outcome and its lines, in/ as the outcome
    says, every file readable, no traceback in the daemon's log since log_start."""
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
        found = sup.FOUND_LINE[abi] in log
        off = sup.revival_off_line(abi) in log
        # 7.1: a tree the kernel's walk would fault on comes after kho_populate accepted.
        walked_into = abi in sup.RADIX_PROFILES and found and WALK_BROKEN in log
        if accepted != (found and not walked_into) or (not accepted) != (off or walked_into):
            problems.append(f"log does not say what happened:\n{log}")
        if os.path.isdir(f"{mnt}/kho/in") != accepted:
            problems.append("kho/in does not match the outcome")
        for root, _dirs, names in os.walk(f"{mnt}/kho"):
            for n in names:
                try:
                    data = sup.read_file(os.path.join(root, n))
                except OSError as e:
                    if e.errno != errno.EFAULT or PAST_MEMORY not in log:
                        problems.append(f"reading {root}/{n}: {e}")
                    continue
                total = struct.unpack_from(">I", corrupted, 4)[0]
                intact = "failed to restore folio for KHO fdt" not in log
                if root.endswith("kho/in") and n == "fdt" and total <= 4096 and intact \
                        and data != corrupted[:total]:
                    problems.append("kho/in/fdt differs from the corrupted root FDT")
    with open(log_path, "rb") as f:
        f.seek(log_start)
        daemon_log = f.read().decode(errors="replace")
    if "Traceback" in daemon_log or "internal error" in daemon_log:
        problems.append("the daemon logged a traceback:\n" + daemon_log[-1500:])
    return problems


FOUND_70, FOUND_71 = sup.FOUND_LINE["7.0"], sup.FOUND_LINE["7.1"]
MOUNT_CASES_7X = {
    # (name, how, expected accepted (None = either), log fragment that must appear)
    "7.0": [
        # A kexec before any write of 1 hands over map 0 (KHO-SPEC §9).
        ("no write of 1 before the kexec", ("nofinalize",), False,
         "KHO: disabling KHO revival: -2"),
        ("bad magic", ("fdt", 0, b"\xd0\x0d\xfe\xee"), False, "is invalid: -9"),
        ("compatible kho-v3", ("compat", b"kho-v3"), False, "is incompatible with 'kho-v1': 1"),
        ("map property length 4", ("maplen", 4), False, BITMAPS_MSG),
        ("map address 0", ("mapval", 0), False, "KHO: disabling KHO revival: -2"),
        ("chunk num_elms 1000", ("chunk", 12, struct.pack("<I", 1000)), True, FOUND_70),
        ("bitmap pointer past memory", ("chunk", 24, struct.pack("<Q", 1 << 40)), True, FOUND_70),
        ("memblock sub-FDT points off its page",
         ("sub", "memblock", 4, struct.pack(">II", 0x7FFFFFFF, 0x7FF00000)), True, FOUND_70),
    ],
    "7.1": [
        # As on a real 7.1.5: root's write into out/fdt (there only on a cold boot) lands in
        # the live FDT, and the next kernel refuses it (KHO-SPEC §9).
        ("bad magic written into out/fdt", ("outfdt", 0, b"\xd0\x0d\xfe\xee"), False,
         "is invalid: -9"),
        ("compatible kho-v1", ("compat", b"kho-v1"), False, "is incompatible with 'kho-v3': 1"),
        ("map property length 4", ("maplen", 4), False, MAP_ERROR["7.1"]),
        ("map address 0", ("mapval", 0), False, "KHO: disabling KHO revival"),
        ("kexec-metadata version 2", ("sub", "kexec-metadata", 0, struct.pack("<I", 2)), True,
         "KHO: kexec-metadata version 2 not supported (expected 1)"),
        ("kexec-metadata count 41", ("sub", "kexec-metadata", 69, struct.pack("<I", 41)), True,
         "(count 41)"),
        ("kexec-metadata blob-size 2", ("child", "kexec-metadata", "blob-size",
                                        struct.pack("<Q", 2)), True,
         "KHO: kexec-metadata blob too small (2 bytes)"),
        ("memblock without blob-size", ("child", "memblock", "blob-size", "unnamed"), True,
         "KHO: node memblock missing or invalid blob-size property"),
        ("radix root entry past memory", ("radix", 1 << 40), None, FOUND_71),
    ],
}
# kho-v4: a 7.1 root is refused as a 6.x one is by 7.1; the rest as 7.1.
for _abi in ("7.2", "7.4"):
    MOUNT_CASES_7X[_abi] = [
        ("compatible kho-v3", ("compat", b"kho-v3"), False, "is incompatible with 'kho-v4': 1")
    ] + [c for c in MOUNT_CASES_7X["7.1"] if c[1][0] != "compat"]


@pytest.mark.fuse
@pytest.mark.parametrize("abi", list(MOUNT_CASES_7X))
def test_handover_corruption_through_mount_7x(mounter, abi):
    from khofs import runtime
    from khofs.client import Client
    args = ("--cmdline", "kho=on reserve_mem=1M:4096:oops", "--memory", "1G", "--abi", abi)
    mnt = mounter.mount(*args)
    log_path = runtime.paths(mnt)["log"]
    out = f"{mnt}/kho/out"
    failures = []
    for name, how, want_acc, fragment in MOUNT_CASES_7X[abi]:
        if sup.khofs("status", mnt, timeout=30).returncode != 0:
            sup.khofs("umount", mnt, timeout=40)
            mounter.mount(*args, at=mnt)
        log_start = os.path.getsize(log_path)
        kind = how[0]
        if abi == "7.0" and kind != "nofinalize":
            sup.write_file(f"{out}/finalize", b"1\n")
        with Client(mnt) as c:
            fdt = c.call("memory_layout")["fdt_phys"]
            root = sup.live_root_fdt(c)
            props = sup.root_props(root)
            map_at, map_val = props["preserved-memory-map"]
            if kind == "fdt":
                c.mem_write(fdt + how[1], how[2])
            elif kind == "outfdt":
                _pwrite(f"{out}/fdt", how[2], how[1])
            elif kind == "compat":
                c.mem_write(fdt + props["compatible"][0], how[1])
            elif kind == "maplen":
                c.mem_write(fdt + map_at - 8, struct.pack(">I", how[1]))
            elif kind == "mapval":
                c.mem_write(fdt + map_at, struct.pack("<Q", how[1]))
            elif kind == "chunk":
                c.mem_write(int.from_bytes(map_val, "little") + how[1], how[2])
            elif kind == "sub":
                _pwrite(f"{out}/sub_fdts/{how[1]}", how[3], how[2])
            elif kind == "child":
                at = fdt + sup.child_props(root)[how[1]][how[2]][0]
                if how[3] == "unnamed":       # its name becomes "compatible"
                    c.mem_write(at - 4, root[props["compatible"][0] - 4:props["compatible"][0]])
                else:
                    c.mem_write(at, how[3])
            elif kind == "radix":
                table = int.from_bytes(map_val, "little")
                i = next(i for i, e in enumerate(struct.unpack("<512Q", c.mem_read(table, 4096)))
                         if e)
                c.mem_write(table + 8 * i, struct.pack("<Q", how[1]))
            corrupted = sup.live_root_fdt(c)
        problems = _kexec_and_judge(mnt, abi, log_path, log_start, corrupted, want_acc, fragment)
        if problems:
            failures.append(f"{name}: " + "; ".join(problems))
    sup.report_family(f"handover corruptions (mount) [{abi}]", len(MOUNT_CASES_7X[abi]), failures)
    assert not failures, "\n".join(failures)
