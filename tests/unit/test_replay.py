"""khofs record / mount --replay without a mount: a recorded kho/ tree made into its
successor's handover (khofs/kernel/replay.py) and the snapshot file (devicetree/snapshot.py)."""

import io
import json
import os
import stat
import tarfile

import libfdt
import pytest

from khofs.devicetree.snapshot import (ROOT_FDT, VERSION, KhoTree, SnapshotError, load,
                                       recording, save)
from khofs.fs.debugfs import Tree
from khofs.kernel.fdt import prop_value_offset, totalsize
from khofs.kernel.machine import Machine, MachineConfig
from khofs.kernel.profile import PROFILES
from khofs.kernel.replay import RecordingError, replay_handover

G = 1 << 30
CMDLINE = "kho=on reserve_mem=4M:4096:oops khofs.test_kho=1"


def boot(abi, cmdline=CMDLINE):
    m = Machine(cmdline, MachineConfig(memory=G, abi=abi))
    if m.profile.has_finalize:
        m.kho_out.set_finalize(1)
    return m


def kho_tree(machine) -> KhoTree:
    """What read_dir would take from a mount of machine: every file as read() returns it."""
    t = Tree(machine)
    tree = KhoTree(meta={"release": machine.release, "cmdline": machine.cmdline,
                         "abi": machine.profile.name})

    def walk(node, rel):
        tree.modes[rel] = node.mode & 0o7777
        if node.is_dir():
            for child in t.listdir(node):
                walk(child, f"{rel}/{child.name}" if rel else child.name)
        else:
            tree.files[rel] = node.open().read(0, 1 << 20)
            tree.mtimes[rel] = node.mtime          # debugfs: the file's creation time
    walk(t.resolve("kho"), "")
    fdt = tree.files.get("out/fdt")
    if fdt is not None and totalsize(fdt) > len(fdt):
        tree.extra[ROOT_FDT] = machine.kho_out.root_fdt()     # what record asks the daemon for
    return tree


def successor(rec, abi=None, cmdline=CMDLINE):
    ho = replay_handover(rec, cmdline, MachineConfig(memory=G, abi=abi or rec.abi), None)
    return Machine(ho.cmdline, MachineConfig(**ho.config), ho, release=ho.release)


def in_files(m):
    t = Tree(m)
    sub = t.resolve("kho/in/sub_fdts")
    return (t.resolve("kho/in/fdt").open().read(0, 1 << 20),
            {n.name: n.open().read(0, 1 << 20) for n in t.listdir(sub)})


def log(m):
    return [line.text for line in m.dmesg]


@pytest.mark.parametrize("abi", list(PROFILES))
def test_round_trip_every_profile(abi):
    old = boot(abi)
    tree = kho_tree(old)
    rec = recording(tree, "snap")
    nxt = successor(rec)
    fdt, subs = in_files(nxt)
    assert fdt == old.kho_out.root_fdt()
    assert fdt.startswith(tree.files["out/fdt"])
    assert subs == {p.split("/")[-1]: data for p, data in tree.files.items()
                    if p.startswith("out/sub_fdts/")}
    assert len(subs) == (3 if PROFILES[abi].kexec_metadata else 2)
    assert nxt.scratch == old.scratch
    assert nxt.kho_in.scratch == old.scratch
    assert "Revived memory reservation 'oops' from KHO" in log(nxt)
    assert [r.start for r in nxt.reserve_mem] == [r.start for r in old.reserve_mem]
    # test_kho's folios are preserved memory, which no recording holds: its checks fail.
    assert "test_kho: KHO restore failed" in log(nxt)
    assert nxt.previous_release == old.release and nxt.kexec_count == 1
    st = nxt.status()["replay"]
    assert st["snapshot"] == "snap" and st["recorded_abi"] == abi
    assert st["recorded_release"] == old.release
    assert st["not_recorded"][0] == "the contents of preserved memory: they read as zeros here"
    assert f"in the {abi} format" in st["not_recorded"][1]
    assert st["ignored"] == []
    exec_from = [line for line in log(nxt) if line.startswith("KHO: exec from:")]
    assert exec_from == ([f"KHO: exec from: {old.release} (count 1)"]
                         if PROFILES[abi].kexec_metadata else [])


@pytest.mark.parametrize("abi", list(PROFILES))
def test_the_written_map_preserves_what_the_recording_shows(abi):
    old = boot(abi)
    rec = recording(kho_tree(old), "snap")
    nxt = successor(rec)
    runs = {(p, s) for _, p, s in nxt.incoming_runs}
    covered = lambda a, n: any(p <= a and a + n <= p + s for p, s in runs)  # noqa: E731
    assert covered(nxt.kho_in.fdt_phys, 4096)
    for name, phys, size in nxt.kho_in.blobs:
        assert covered(phys - phys % 4096, 4096), name
    oops = old.reserve_mem[0]
    assert covered(oops.start, oops.size)
    # Nothing else: test_kho's folios, preserved by the old kernel, are not in the map.
    assert nxt.preserved.total() == sum(s for _, _, s in nxt.incoming_runs)
    assert nxt.preserved.total() < old.kho_out.track.preserved_bytes()
    assert "KHO: failed to restore folio for KHO fdt" not in log(nxt)


def test_the_map_sits_where_out_fdt_says():
    old = boot("6.18")
    rec = recording(kho_tree(old), "snap")
    ho = replay_handover(rec, CMDLINE, MachineConfig(memory=G), None)
    fdt = libfdt.Fdt(bytearray(rec.fdt))
    mp = int.from_bytes(bytes(fdt.getprop(0, "preserved-memory-map")), "little")
    assert mp == old.kho_out.preserved_mem_map
    assert any(ho.pages[mp >> 12]) and ho.fdt_phys != mp


@pytest.mark.parametrize("src,dst,line", [
    ("6.18", "7.1", "KHO: setup: handover FDT ({:#x}) is incompatible with 'kho-v3': 1"),
    ("7.1", "6.18", "KHO: setup: handover FDT ({:#x}) is incompatible with 'kho-v1': 1"),
])
def test_replay_into_another_release_is_judged_by_it(src, dst, line):
    rec = recording(kho_tree(boot(src)), "snap")
    nxt = successor(rec, abi=dst)
    assert nxt.kho_in is None
    ho_fdt = [t for t in log(nxt) if "incompatible" in t]
    assert len(ho_fdt) == 1 and ho_fdt[0].startswith(line.split("(")[0])
    assert line.split(")")[1] in ho_fdt[0]


def test_replay_6_18_into_7_0_revives():
    nxt = successor(recording(kho_tree(boot("6.18")), "snap"), abi="7.0")
    assert nxt.kho_in is not None
    assert "Revived memory reservation 'oops' from KHO" in log(nxt)


# -- recordings edited by hand ----------------------------------------------------------
def edited(abi="6.18"):
    return kho_tree(boot(abi, "kho=on reserve_mem=4M:4096:oops"))


def edited_from(machine):
    return kho_tree(machine)


def refusal(tree):
    with pytest.raises(SnapshotError) as ei:
        recording(tree, "snap")
    return str(ei.value)


def test_missing_sub_fdt():
    tree = edited()
    del tree.files["out/sub_fdts/memblock"], tree.modes["out/sub_fdts/memblock"]
    assert refusal(tree) == ("kho/out/fdt names subtree 'memblock' but "
                             "out/sub_fdts/memblock is not in the recording")


def test_truncated_sub_fdt():
    tree = edited()
    tree.files["out/sub_fdts/memblock"] = tree.files["out/sub_fdts/memblock"][:100]
    assert refusal(tree) == ("kho/out/sub_fdts/memblock: truncated FDT (100 of the 210 bytes "
                             "its header says)")


def test_truncated_v3_blob_disagrees_with_blob_size():
    tree = edited("7.1")
    tree.files["out/sub_fdts/kexec-metadata"] = tree.files["out/sub_fdts/kexec-metadata"][:40]
    assert refusal(tree) == ("kho/out/sub_fdts/kexec-metadata: 40 bytes, but out/fdt's "
                             "blob-size says 73")


@pytest.mark.parametrize("abi,unseen", [("7.0", "kho_test"), ("7.1", "kexec-metadata")])
def test_short_7x_out_fdt_is_rebuilt_the_kernels_way(abi, unseen):
    """What a real 7.x kernel's debugfs shows (out/fdt cut at the size it had when made, no
    extra/): the rest of the root FDT is rebuilt, each child the shown bytes do not place
    goes to a free page, and the successor revives as from the whole FDT."""
    old = boot(abi)
    tree = edited_from(old)
    del tree.extra[ROOT_FDT]
    tree.meta = {}                              # a plain copy: no release, no abi
    shown = tree.files["out/fdt"]
    rec = recording(tree, "snap")
    assert rec.abi == abi and rec.unplaced == [unseen]
    assert rec.notes == [] and rec.shown == len(shown)
    nxt = successor(rec)
    assert nxt.replay["not_recorded"][1] == (
        f"the root FDT past the {len(shown)} bytes out/fdt showed (its size was fixed when the "
        f"file was made): khofs rebuilt its {len(old.kho_out.root_fdt())} bytes the kernel's way")
    fdt, subs = in_files(nxt)
    assert fdt.startswith(shown) and len(fdt) == len(old.kho_out.root_fdt())
    # Byte for byte the FDT the old kernel had, but for the address khofs chose.
    prop = "preserved-data" if abi == "7.1" else "fdt"
    real, got = libfdt.Fdt(old.kho_out.root_fdt()), bytearray(fdt)
    off = prop_value_offset(got, libfdt.Fdt(got).path_offset("/" + unseen), prop)
    got[off:off + 8] = bytes(real.getprop(real.path_offset("/" + unseen), prop))
    assert bytes(got) == old.kho_out.root_fdt()
    assert subs == {n: tree.files[f"out/sub_fdts/{n}"] for n in subs} and unseen in subs
    placed = [n for n in nxt.replay["not_recorded"] if n.startswith("where out/sub_fdts/")]
    assert len(placed) == 1 and placed[0].startswith(
        f"where out/sub_fdts/{unseen} lived (past the bytes out/fdt showed): khofs placed it at 0x")
    assert "Revived memory reservation 'oops' from KHO" in log(nxt)
    if abi == "7.1":
        assert f"KHO: exec from: {old.release} (count 1)" in log(nxt)


def test_short_out_fdt_that_cannot_be_rebuilt():
    tree = edited_from(boot("7.1"))
    del tree.extra[ROOT_FDT]
    tree.files["out/fdt"] = tree.files["out/fdt"][:80]          # the map's address is cut off
    assert refusal(tree) == ("kho/out/fdt: truncated FDT (80 of the 353 bytes its header says), "
                             "and khofs cannot rebuild the rest the 7.1 kernel's way: the map's "
                             "address is not among the bytes shown")
    tree = edited_from(boot("7.1"))
    del tree.extra[ROOT_FDT]
    # Not what the kernel makes: a 7.1 kernel's compatible is kho-v3.
    tree.files["out/fdt"] = tree.files["out/fdt"].replace(b"kho-v3\0", b"kho-v9\0")
    tree.meta["abi"] = "7.1"
    assert refusal(tree).endswith("the kernel's edits with kexec-metadata as the children not "
                                  "shown do not give back the bytes shown")


def test_a_stray_file_in_a_short_7x_copy_is_left_out():
    """The shown header's sizes leave no room for one more child: the stray file is not one."""
    tree = edited_from(boot("7.1"))
    del tree.extra[ROOT_FDT]
    tree.files["out/sub_fdts/stray"] = b"x"
    tree.modes["out/sub_fdts/stray"] = 0o400
    rec = recording(tree, "s")
    assert rec.unplaced == ["kexec-metadata"]
    assert successor(rec).replay["ignored"] == [
        "out/sub_fdts/stray is not named in out/fdt: not handed over"]


def test_garbage_out_fdt():
    tree = edited()
    tree.files["out/fdt"] = b"\0" * 64
    assert refusal(tree).startswith("kho/out/fdt: not a valid FDT (")


def test_not_finalized():
    tree = kho_tree(Machine("kho=on", MachineConfig(memory=G)))
    assert refusal(tree) == ("kho/out/fdt is missing: KHO hands nothing over until it is "
                             "finalized; run echo 1 > kho/out/finalize, then record again")


def test_7_0_never_finalized_hands_nothing_over():
    tree = kho_tree(Machine("kho=on", MachineConfig(memory=G, abi="7.0")))
    assert refusal(tree) == ("kho/out/fdt's preserved-memory-map is 0: the recorded kernel hands "
                             "nothing over until finalized (echo 1 > kho/out/finalize)")


def test_7x_after_a_kexec_shows_no_out_fdt():
    m = Machine("kho=on", MachineConfig(memory=G, abi="7.1"))
    m.kexec_load()
    ho = m.kexec_exec()
    nxt = Machine(ho.cmdline, MachineConfig(**ho.config), ho)
    assert refusal(kho_tree(nxt)).startswith("kho/out/fdt is missing: a 7.x kernel shows it "
                                             "only after a cold boot")


def test_extra_files_are_kept_and_named():
    tree = edited()
    tree.files["out/sub_fdts/stray"] = tree.files["out/sub_fdts/memblock"]
    tree.modes["out/sub_fdts/stray"] = 0o400
    tree.files["out/notes.txt"], tree.modes["out/notes.txt"] = b"hi", 0o644
    rec = recording(tree, "snap")
    nxt = successor(rec, cmdline="kho=on reserve_mem=4M:4096:oops")
    assert nxt.replay["ignored"] == [
        "out/notes.txt is not part of a KHO debugfs tree: kept, not replayed",
        "out/sub_fdts/stray is not named in out/fdt: not handed over"]
    assert [b[0] for b in nxt.kho_in.blobs] == ["memblock"]


def test_wrong_compatible_is_the_next_kernels_to_judge():
    tree = edited()
    tree.files["out/fdt"] = tree.files["out/fdt"].replace(b"kho-v1\0", b"kho-v9\0")
    cmdline = "kho=on reserve_mem=4M:4096:oops"
    ho = replay_handover(recording(tree, "snap"), cmdline, MachineConfig(memory=G), None)
    nxt = Machine(ho.cmdline, MachineConfig(**ho.config), ho)
    assert nxt.kho_in is None
    assert [t for t in log(nxt) if "KHO" in t] == [
        f"KHO: setup: handover FDT (0x{ho.fdt_phys:x}) is incompatible with 'kho-v1': 1",
        "KHO: disabling KHO revival: -22"]


def test_sub_blob_in_scratch_is_refused():
    tree = edited()
    scratch = tree.files["out/scratch_phys"].split()[0]
    fdt = bytearray(tree.files["out/fdt"])
    f = libfdt.Fdt(fdt)
    f.setprop(f.path_offset("/memblock"), "fdt", int(scratch, 16).to_bytes(8, "little"))
    tree.files["out/fdt"] = bytes(f.as_bytearray())
    assert "lies in scratch area 0" in refusal(tree)


def test_memory_too_small():
    rec = recording(edited(), "snap")
    with pytest.raises(RecordingError, match="--memory must be at least"):
        replay_handover(rec, CMDLINE, MachineConfig(memory=512 << 20), None)


# -- the snapshot file -----------------------------------------------------------------
def test_save_and_load_keep_every_byte_and_mode(tmp_path):
    tree = kho_tree(boot("7.1"))
    tree.meta["source"] = {"kind": "khofs", "path": "/x/kho"}
    path = str(tmp_path / "s.khosnap")
    save(tree, path)
    back = load(path)
    assert back.files == tree.files and back.modes == tree.modes and back.extra == tree.extra
    assert back.meta == tree.meta
    with tarfile.open(path) as tar:
        names = tar.getnames()
        assert names[0] == "manifest.json"
        man = json.load(tar.extractfile("manifest.json"))
        assert tar.getmember("kho/out/fdt").mode == 0o400
        assert tar.getmember("kho/out").isdir() and tar.getmember("kho/out").mode == 0o755
    assert man["format"] == "khofs-snapshot" and man["version"] == VERSION
    assert "members" not in man
    assert names[1:4] == ["kho", "kho/out", "kho/out/fdt"]
    assert names[-2:] == [f"extra/{ROOT_FDT}", "khofs-snapshot.end"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(tmp_path) == ["s.khosnap"]


def _tar(path, members, end=True):
    with tarfile.open(path, "w") as tar:
        for name, data in members + ([("khofs-snapshot.end", b"")] if end else []):
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(data, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, data[1]
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def manifest(**kw):
    return json.dumps(dict({"format": "khofs-snapshot", "version": VERSION}, **kw)).encode()


@pytest.mark.parametrize("members,msg", [
    ([("kho", None)], "not a khofs snapshot (no manifest.json first)"),
    ([("manifest.json", b"{"), ("kho", None)], "manifest.json is not JSON"),
    ([("manifest.json", b'{"format": "other", "version": 1}')],
     'not a khofs snapshot (manifest.json has no format "khofs-snapshot")'),
    ([("manifest.json", manifest(version=0)), ("kho", None)],
     "snapshot format version 0 is not one this khofs reads (it reads version 1); record "
     "the tree again with this khofs"),
    ([("manifest.json", manifest(version=2)), ("kho", None)],
     "snapshot format version 2 is not one this khofs reads (it reads version 1); record "
     "the tree again with this khofs"),
    ([("manifest.json", manifest())], "the snapshot holds no kho/ directory"),
    ([("manifest.json", manifest()), ("kho", None), ("kho/../../etc/passwd", b"x")],
     "unexpected member 'kho/../../etc/passwd'"),
    ([("manifest.json", manifest()), ("kho", None), ("kho/out", ("sym", "/etc"))],
     "unexpected member 'kho/out'"),
    ([("manifest.json", manifest()), ("elsewhere", b"x")], "unexpected member 'elsewhere'"),
    ([("manifest.json", manifest()), ("kho", None), ("extra/other", b"x")],
     "unexpected member 'extra/other'"),
    ([("manifest.json", manifest(memory="lots")), ("kho", None)],
     "manifest.json: memory must be a positive number"),
    ([("manifest.json", manifest(nodes=0)), ("kho", None)],
     "manifest.json: nodes must be a positive number"),
    ([("manifest.json", manifest(cmdline=5)), ("kho", None)],
     "manifest.json: cmdline must be str"),
    ([("manifest.json", manifest(source=[1])), ("kho", None)],
     "manifest.json: source must be dict"),
    ([("manifest.json", manifest(abi="9.9")), ("kho", None)],
     "manifest.json: abi '9.9' is not a profile khofs knows (6.18, 6.16, 7.0, 7.1, 7.2, 7.4)"),
])
def test_bad_snapshots(tmp_path, members, msg):
    path = str(tmp_path / "bad")
    _tar(path, members)
    with pytest.raises(SnapshotError) as ei:
        load(path)
    assert str(ei.value).startswith(f"{path}: ")
    assert msg in str(ei.value)


def test_a_snapshot_without_its_end_marker(tmp_path):
    path = str(tmp_path / "cut")
    _tar(path, [("manifest.json", manifest()), ("kho", None)], end=False)
    with pytest.raises(SnapshotError, match="damaged snapshot \\(no khofs-snapshot.end member"):
        load(path)


def test_hand_edits_with_tar(tmp_path):
    """Members deleted (tar --delete) or appended after the end marker (tar -r) read as the
    tree they make; an extra/ directory entry (tar -c ... extra) is fine."""
    tree = kho_tree(boot("7.1"))
    path = str(tmp_path / "s")
    save(tree, path)
    with tarfile.open(path) as tar:
        kept = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()
                if m.name != "kho/out/finalize"]
    with tarfile.open(path, "w") as tar:
        for m, data in kept:
            tar.addfile(m, io.BytesIO(data) if data is not None else None)
        info = tarfile.TarInfo("extra")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        info = tarfile.TarInfo("kho/out/README")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    back = load(path)
    assert "out/finalize" not in back.files and back.files["out/README"] == b"hi"
    assert back.extra == tree.extra


def test_not_a_tar(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"hello")
    with pytest.raises(SnapshotError, match="not a khofs snapshot \\(not a tar archive\\)"):
        load(str(path))


def test_truncated_file(tmp_path):
    tree = kho_tree(boot("6.18"))
    path = tmp_path / "s"
    save(tree, str(path))
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        inside = tar.getmember("kho/out/fdt").offset_data + 10
        cut = tar.getmember("kho/out/scratch_phys").offset
    path.write_bytes(data[:inside])
    with pytest.raises(SnapshotError, match="damaged snapshot \\(unexpected end of data\\)"):
        load(str(path))
    path.write_bytes(data[:cut])                # at a member's end: the manifest tells
    with pytest.raises(SnapshotError, match="damaged snapshot \\(no khofs-snapshot.end member: "
                       "the file was cut short\\)"):
        load(str(path))


def test_a_failed_save_leaves_nothing(tmp_path, monkeypatch):
    tree = kho_tree(boot("6.18"))
    target = tmp_path / "d"
    target.mkdir()
    (target / "x").write_text("kept")
    with pytest.raises(SnapshotError, match=f"cannot write {target}: Is a directory"):
        save(tree, str(target))
    assert os.listdir(tmp_path) == ["d"] and os.listdir(target) == ["x"]
    # Interrupted half way (Ctrl-C): no temporary file stays behind either.
    calls = []

    def addfile(self, *a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *a, **kw)
    real = tarfile.TarFile.addfile
    monkeypatch.setattr(tarfile.TarFile, "addfile", addfile)
    with pytest.raises(KeyboardInterrupt):
        save(tree, str(tmp_path / "s"))
    assert os.listdir(tmp_path) == ["d"]


def test_recording_a_directory_without_release_guesses_the_abi_from_the_tree():
    for abi, guess in (("6.18", "6.18"), ("7.1", "7.1")):
        tree = kho_tree(boot(abi, "kho=on"))
        tree.meta = {}
        assert recording(tree, "s").abi == guess
        tree.meta = {"release": "6.17.1"}
        assert recording(tree, "s").abi == "6.16"



# -- what the review of the first version found ---------------------------------------------
def _with_scratch(tree, areas):
    tree.files["out/scratch_phys"] = "".join(f"0x{a:x}\n" for a, _ in areas).encode()
    tree.files["out/scratch_len"] = "".join(f"0x{s:x}\n" for _, s in areas).encode()
    return tree


def test_nothing_khofs_places_lands_in_scratch():
    """A lowmem scratch area that ends at the top of RAM: the root FDT and the map's own
    pages stay out of every scratch area, and the root FDT takes the lowest free page."""
    tree = edited()
    old = [tuple(int(x, 16) for x in tree.files[f"out/scratch_{k}"].split())
           for k in ("phys", "len")]
    areas = list(zip(*old))
    areas[0] = (2 * G - areas[0][1], areas[0][1])        # lowmem now ends at the top of 2 GiB
    rec = recording(_with_scratch(tree, areas), "snap")
    ho = replay_handover(rec, "kho=on reserve_mem=4M:4096:oops", MachineConfig(memory=2 * G),
                         None)
    nxt = Machine(ho.cmdline, MachineConfig(**ho.config), ho)
    in_scratch = lambda p: any(a <= p < a + s for a, s in areas)  # noqa: E731
    assert not in_scratch(ho.fdt_phys)
    assert ho.fdt_phys == 1 << 20          # the lowest page above firmware's first MiB
    for _, p, n in nxt.incoming_runs:
        assert not any(in_scratch(q) for q in range(p, p + n, 4096)), hex(p)
    mp = int.from_bytes(libfdt.Fdt(bytearray(rec.fdt)).getprop(0, "preserved-memory-map"),
                        "little")
    map_pages = {pfn << 12 for pfn in ho.pages} - {ho.fdt_phys}
    assert mp in map_pages


@pytest.mark.parametrize("phys,lens,msg", [
    ("-0x10\n0x0\n0x0\n", None, "kho/out/scratch_phys: not one 0x-prefixed hex number a line"),
    ("0x1ffffffffffffffff\n0x0\n0x0\n", None, "kho/out/scratch_phys: not one 0x-prefixed"),
    ("123\n0x0\n0x0\n", None, "kho/out/scratch_phys: not one 0x-prefixed hex number a line"),
    ("0x10000000\n0x0\n0x0", None, "kho/out/scratch_phys: not one 0x-prefixed"),
    (None, "0x0\n0x0\n0x0\n", "kho/out/scratch_len lists no scratch area of nonzero size"),
    ("0x10000000\n0x10100000\n0x0\n", "0x1000000\n0x1000000\n0x0\n",
     "kho/out/scratch_phys: scratch area 0 and scratch area 1 overlap"),
    ("0xfffffffffffff000\n0x0\n0x0\n", "0x2000\n0x0\n0x0\n",
     "kho/out/scratch_phys: scratch area 0 ends past 2^52, the largest physical address"),
    (None, "0x20\n0x0\n0x0\n", "kho/out/scratch_len: no scratch area can hold the 48-byte "
     "kho_scratch array"),
])
def test_bad_scratch_text(phys, lens, msg):
    tree = edited()
    if phys is not None:
        tree.files["out/scratch_phys"] = phys.encode()
    if lens is not None:
        tree.files["out/scratch_len"] = lens.encode()
    assert refusal(tree).startswith(msg)


def test_root_fdt_larger_than_a_page():
    tree = edited()
    f = libfdt.Fdt(bytearray(tree.files["out/fdt"]))
    f.resize(6140)
    tree.files["out/fdt"] = bytes(f.as_bytearray())
    assert refusal(tree) == "kho/out/fdt: 6140 bytes, but a root FDT is one page (4096 bytes)"


def test_reserve_mem_region_in_scratch():
    tree = edited()
    lowmem = int(tree.files["out/scratch_phys"].split()[0], 16)
    sub = libfdt.Fdt(bytearray(tree.files["out/sub_fdts/memblock"]))
    sub.setprop(sub.path_offset("/oops"), "start", lowmem.to_bytes(8, "little"))
    tree.files["out/sub_fdts/memblock"] = bytes(sub.as_bytearray())
    assert refusal(tree) == (f"kho/out/sub_fdts/memblock: region 'oops' at 0x{lowmem:x} lies "
                             f"in scratch area 0 [0x{lowmem:x}, ") + refusal(tree).split(", ", 1)[1]
    assert refusal(tree).endswith("which a kernel never preserves")


def test_out_fdt_must_start_the_whole_root_fdt():
    tree = edited("7.1")
    tree.files["out/fdt"] = b"\0" + tree.files["out/fdt"][1:]
    assert refusal(tree) == ("kho/out/fdt is not the start of extra/root-fdt, the whole root FDT "
                             "recorded with it (one of them was edited)")


def test_the_7x_hint_only_for_7x():
    tree = edited("6.18")
    tree.files["out/fdt"] = tree.files["out/fdt"][:100]
    assert refusal(tree) == "kho/out/fdt: truncated FDT (100 of the 196 bytes its header says)"


def test_replay_into_6_16_behaves_as_khofs_kexec_does():
    """6.18's page-sized bitmaps misread by 6.16: as with khofs kexec --abi 6.16, in/ still
    shows the handed-over FDTs (the root FDT page is not the first one the successor takes)."""
    old = boot("6.18")
    rec = recording(kho_tree(old), "snap")
    nxt = successor(rec, abi="6.16")
    fdt, subs = in_files(nxt)
    assert fdt == old.kho_out.root_fdt() and sorted(subs) == ["kho_test", "memblock"]
    old.kexec_load(abi="6.16")
    ho = old.kexec_exec()
    via_kexec = Machine(ho.cmdline, MachineConfig(**ho.config), ho)
    assert sorted(b[0] for b in via_kexec.kho_in.blobs) == sorted(subs)
    assert [t for t in log(nxt) if "test_kho" in t] == \
        [t for t in log(via_kexec) if "test_kho" in t] == ["test_kho: KHO restore failed"]


def test_a_71_successor_recorded_keeps_its_count():
    """A 7.1 kernel that was itself a successor: out/fdt is not in its debugfs, khofs record
    takes the root FDT from the daemon; the replayed kernel is the third, count 2."""
    first = boot("7.1")
    first.kexec_load()
    ho = first.kexec_exec()
    second = Machine(ho.cmdline, MachineConfig(**ho.config), ho)
    tree = kho_tree(second)
    assert "out/fdt" not in tree.files
    tree.extra[ROOT_FDT] = second.kho_out.root_fdt()
    nxt = successor(recording(tree, "snap"))
    assert nxt.kexec_count == 2
    assert f"KHO: exec from: {second.release} (count 2)" in log(nxt)


def test_summary_counts_only_handed_over_blobs():
    tree = edited()
    tree.files["out/sub_fdts/stray"] = tree.files["out/sub_fdts/memblock"]
    tree.modes["out/sub_fdts/stray"] = 0o400
    assert [c.name for c in recording(tree, "s").plan.kids] == ["memblock"]


def _dtb(compat):
    sw = libfdt.FdtSw()
    sw.finish_reservemap()
    sw.begin_node("")
    sw.property_string("compatible", compat)
    sw.end_node()
    b = bytes(sw.as_fdt().as_bytearray())
    return b[:int.from_bytes(b[4:8], "big")]


@pytest.mark.parametrize("abi", ["7.0", "7.1"])
@pytest.mark.parametrize("names", [("alpha", "beta"), ("alpha", "beta", "gamma"),
                                   ("zyxwvutsrqponmlkjihg",), ("zeta", "mid", "big", "alpha"),
                                   ("kho_t", "kho_x", "aaa")])
@pytest.mark.parametrize("times", [True, False])
def test_rebuilt_root_fdt_is_the_kernels(abi, names, times):
    """Subtrees added after boot, in an order their names do not sort in, some cut off
    whole, one cut in its name or its properties: with the files' creation times the rebuilt
    FDT is the kernel's byte for byte but for the addresses it could not see; without
    them it still starts with every byte shown."""
    from khofs.kernel.producers.user import UserSubtree
    old = boot(abi, "kho=on reserve_mem=4M:4096:oops khofs.test_kho=1")
    for n in names:
        UserSubtree(old.kho_out, n, _dtb(f"{n}-v1")).init_subtree(old.kho_out)
    if abi == "7.0":
        old.kho_out.set_finalize(1)
    tree = kho_tree(old)
    del tree.extra[ROOT_FDT]
    if not times:
        tree.mtimes = {}
    rec = recording(tree, "s")
    real = old.kho_out.root_fdt()
    assert rec.fdt.startswith(tree.files["out/fdt"]) and len(rec.fdt) == len(real)
    prop = "preserved-data" if abi == "7.1" else "fdt"
    got, want = bytearray(rec.fdt), libfdt.Fdt(real)
    for n in rec.unplaced:
        off = prop_value_offset(got, libfdt.Fdt(got).path_offset("/" + n), prop)
        got[off:off + 8] = bytes(want.getprop(want.path_offset("/" + n), prop))
    if times:
        assert bytes(got) == real
    nxt = successor(rec)
    assert sorted(in_files(nxt)[1]) == sorted(n.split("/")[-1] for n in tree.files
                                              if n.startswith("out/sub_fdts/"))
    assert "Revived memory reservation 'oops' from KHO" in log(nxt)


def test_no_room_for_the_written_map_is_one_clear_error():
    """Scratch areas fill every gap but three pages: the root FDT fits, the radix tree's
    tables do not."""
    tree = edited("7.1")
    rec = recording(tree, "s")
    pl = rec.plan
    used = sorted([(c.phys & ~0xFFF, (c.phys + len(c.data) + 0xFFF) & ~0xFFF) for c in pl.kids] +
                  [(pl.map_phys, pl.map_phys + 4096)] + [(s, s + n) for _, s, n in pl.regions])
    gaps, at = [], (1 << 20) + 3 * 4096
    for s, e in used:
        if s > at:
            gaps.append((at, s - at))
        at = max(at, e)
    if at < G:
        gaps.append((at, G - at))
    rec = recording(_with_scratch(tree, gaps), "s")
    with pytest.raises(RecordingError, match=r"^no free memory left in 0x40000000 for the memory "
                       r"map khofs writes \(give more --memory\)$"):
        replay_handover(rec, CMDLINE, MachineConfig(memory=G), None)


def test_a_71_child_without_blob_size_is_not_handed_over():
    """A failed kho_add_subtree leaves the node with only preserved-data; the successor skips
    it (no in/ file), so the recording needs no blob for it."""
    tree = edited("7.1")
    fdt = tree.extra[ROOT_FDT]
    buf = bytearray(4096)
    buf[:len(fdt)] = fdt
    assert libfdt.fdt_open_into(buf, buf, 4096) == 0
    node = libfdt.fdt_add_subnode(buf, 0, "leftover")
    assert libfdt.fdt_setprop(buf, node, "preserved-data", (0x2000).to_bytes(8, "little"), 8) == 0
    libfdt.fdt_pack(buf)
    tree.extra[ROOT_FDT] = bytes(buf[:totalsize(buf)])
    tree.files["out/fdt"] = tree.extra[ROOT_FDT][:len(tree.files["out/fdt"])]
    nxt = successor(recording(tree, "s"))
    assert "leftover" not in in_files(nxt)[1]
    assert "KHO: node leftover missing or invalid blob-size property" in log(nxt)


def test_a_70_copy_whose_out_fdt_outlived_a_removed_subtree_is_taken_for_70():
    """7.0 keeps out/fdt's size from boot: after a subtree is added and removed it is longer
    than the FDT, which 6.16-6.18 never show."""
    from khofs.kernel.producers.user import UserSubtree
    m = Machine("kho=on", MachineConfig(memory=G, abi="7.0"))
    sub = UserSubtree(m.kho_out, "a", _dtb("a-v1"))
    sub.init_subtree(m.kho_out)
    sub.remove_subtree(m.kho_out)
    m.kho_out.set_finalize(1)
    tree = kho_tree(m)
    tree.meta = {}
    assert totalsize(tree.files["out/fdt"]) < len(tree.files["out/fdt"])
    assert recording(tree, "s").abi == "7.0"


def test_map_of_a_short_70_copy_keeps_memblocks_regions_and_says_why_not():
    from khofs.devicetree.memmap import MapSourceError, from_tree
    from khofs.kernel.producers.user import UserSubtree
    old = boot("7.0", "kho=on reserve_mem=4M:4096:oops")
    for n in ("alpha", "beta"):
        UserSubtree(old.kho_out, n, _dtb(f"{n}-v1")).init_subtree(old.kho_out)
    old.kho_out.set_finalize(1)
    tree = kho_tree(old)
    del tree.extra[ROOT_FDT]
    lay = from_tree(tree, "copy")
    assert [(r.label, r.start, r.size) for r in lay.of("reserve_mem")] == \
        [("oops", old.reserve_mem[0].start, 4 << 20)]
    fdts = [r.label for r in lay.of("fdt")]
    assert "out/sub_fdts/memblock" not in fdts and "out/sub_fdts/beta" in fdts
    assert any(n.endswith("but where memblock, alpha live is not shown") for n in lay.notes)
    tree.files["out/fdt"] = tree.files["out/fdt"].replace(b"kho-v1\0", b"kho-v9\0")
    with pytest.raises(MapSourceError, match="cannot rebuild the rest the kernel's way: the "
                       "kernel's edits with memblock, alpha as the children not shown"):
        from_tree(tree, "copy")


def test_a_name_libfdt_cannot_take_is_one_clear_error():
    tree = edited("7.1")
    del tree.extra[ROOT_FDT]
    name = b"\xff".decode(errors="surrogateescape")         # how os.walk gives such a name
    tree.files[f"out/sub_fdts/{name}"] = b"x"
    tree.modes[f"out/sub_fdts/{name}"] = 0o400
    assert refusal(tree).endswith("has a name that is not UTF-8, which no kernel node name is")
