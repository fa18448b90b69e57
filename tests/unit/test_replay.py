"""khofs record / mount --replay without a mount: a recorded kho/ tree made into its
successor's handover (khofs/kernel/replay.py) and the snapshot file (devicetree/snapshot.py)."""

import io
import json
import os
import tarfile

import libfdt
import pytest

from khofs.devicetree.snapshot import (ROOT_FDT, VERSION, KhoTree, SnapshotError, load,
                                       recording, save)
from khofs.fs.debugfs import Tree
from khofs.kernel.fdt import totalsize
from khofs.kernel.machine import Machine, MachineConfig
from khofs.kernel.profile import PROFILES
from khofs.kernel.replay import RecordingError, profile_of_release, replay_handover

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
    assert len(subs) == (3 if abi == "7.1" else 2)
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
    assert exec_from == ([f"KHO: exec from: {old.release} (count 1)"] if abi == "7.1" else [])


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


def test_short_7x_out_fdt_without_the_whole_fdt():
    tree = edited("7.1")
    del tree.extra[ROOT_FDT]
    msg = refusal(tree)
    assert msg.startswith("kho/out/fdt: truncated FDT (")
    assert msg.endswith("the rest of its FDT is not in debugfs")


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
        "kho/out/notes.txt is not part of a KHO debugfs tree: kept, not replayed",
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


@pytest.mark.parametrize("release,abi", [
    ("6.15.2", None), ("6.16.0-rc1", "6.16"), ("6.17.9-arch1", "6.16"), ("6.18.44-fc-v1272", "6.18"),
    ("6.19.0", "7.0"), ("7.0.3", "7.0"), ("7.1.5", "7.1"), ("7.4.0-next", "7.1"), ("weird", None)])
def test_profile_of_release(release, abi):
    assert profile_of_release(release) == abi


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
    assert man["members"][:3] == ["kho", "kho/in", "kho/in/fdt"] or \
        man["members"][:3] == ["kho", "kho/out", "kho/out/fdt"]
    assert man["members"][-1] == f"extra/{ROOT_FDT}"
    assert os.listdir(tmp_path) == ["s.khosnap"]


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
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
])
def test_bad_snapshots(tmp_path, members, msg):
    path = str(tmp_path / "bad")
    _tar(path, members)
    with pytest.raises(SnapshotError) as ei:
        load(path)
    assert str(ei.value).startswith(f"{path}: ")
    assert msg in str(ei.value)


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
    with pytest.raises(SnapshotError, match="damaged snapshot \\(kho/out/scratch_phys is "
                       "listed in manifest.json but not in the archive"):
        load(str(path))


def test_a_failed_save_leaves_nothing(tmp_path):
    tree = kho_tree(boot("6.18"))
    target = tmp_path / "s"
    save(tree, str(target))
    before = target.read_bytes()
    # The temporary file cannot be made (root passes mode checks: a directory is in the way).
    (tmp_path / f"s.tmp{os.getpid()}").mkdir()
    with pytest.raises(SnapshotError, match=f"cannot write {target}: Is a directory"):
        save(KhoTree(modes={"": 0o700}), str(target))
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["s", f"s.tmp{os.getpid()}"]


def test_recording_a_directory_without_release_guesses_the_abi_from_the_tree():
    for abi, guess in (("6.18", "6.18"), ("7.1", "7.1")):
        tree = kho_tree(boot(abi, "kho=on"))
        tree.meta = {}
        assert recording(tree, "s").abi == guess
        tree.meta = {"release": "6.17.1"}
        assert recording(tree, "s").abi == "6.16"

