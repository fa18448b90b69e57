"""The profile table is the one place a release's KHO is described: the release names it, an
FDT is matched to it, no other module names a profile or parses a release, and a profile
that only the table knows boots, shows its files and kexecs."""

import ast
import dataclasses
import re
from pathlib import Path

import libfdt
import pytest

import khofs
from khofs.fs.debugfs import Tree
from khofs.kernel import profile as profile_mod
from khofs.kernel.fdt import subnodes
from khofs.kernel.handover import Handover
from khofs.kernel.machine import Machine, MachineConfig
from khofs.kernel.profile import (NO_KHO, PROFILES, get_profile, profile_for_fdt,
                                  profile_for_release, release_profile_name, scratch_files_in)

ROOT = Path(khofs.__file__).parent
G = 1 << 30


@pytest.mark.parametrize("release,abi", [
    ("6.12.0", NO_KHO), ("6.15.2", NO_KHO), ("6.16.0-rc1", "6.16"), ("6.17.9-arch1", "6.16"),
    ("6.18.44-fc-v1272", "6.18"), ("6.19.0", "7.0"), ("7.0.3", "7.0"), ("7.1.5", "7.1"),
    ("7.2.3", "7.2"), ("7.3.0-rc2", "7.2"), ("7.4.0-next", "7.4"), ("8.1.0", "7.4"),
    ("weird", None), ("my-kernel", None), ("v7.2", None)])
def test_the_release_names_the_profile(release, abi):
    assert release_profile_name(release) == abi
    want = None if abi == NO_KHO else PROFILES[abi or "6.18"]
    assert profile_for_release(release) is want


def test_six_profiles_and_what_differs_in_the_new_ones():
    assert list(PROFILES) == ["6.18", "6.16", "7.0", "7.1", "7.2", "7.4"]
    p71, p72, p74 = PROFILES["7.1"], PROFILES["7.2"], PROFILES["7.4"]
    diff = {f.name for f in dataclasses.fields(p71) if getattr(p71, f.name) != getattr(p72, f.name)}
    assert diff == {"name", "first", "compatible"} and p72.compatible == "kho-v4"
    diff = {f.name for f in dataclasses.fields(p72) if getattr(p72, f.name) != getattr(p74, f.name)}
    assert diff == {"name", "first", "scratch_files", "scratch_param"}
    assert p74.scratch_files == ("bootmem_phys", "bootmem_len")
    assert p74.scratch_param == "kho_bootmem"
    assert [p.release for p in PROFILES.values()] == [
        "6.18.0-khofs", "6.16.0-khofs", "7.0.0-khofs", "7.1.0-khofs", "7.2.0-khofs",
        "7.4.0-khofs"]


def root_fdt(abi):
    return Machine("kho=on", MachineConfig(memory=G, abi=abi)).kho_out.root_fdt()


def test_an_fdt_names_its_profile():
    assert profile_for_fdt(root_fdt("7.1")).name == "7.1"
    # kho-v4: 7.4 beside bootmem_* files, 7.2 beside scratch_*, the newest when nothing says
    assert profile_for_fdt(root_fdt("7.2"), True, ["fdt", "scratch_len", "scratch_phys"]).name \
        == "7.2"
    assert profile_for_fdt(root_fdt("7.4"), True, ["bootmem_len", "bootmem_phys"]).name == "7.4"
    assert profile_for_fdt(root_fdt("7.2")).name == "7.4"
    # kho-v1: 6.19+ cut out/fdt short, 6.16-6.18 do not
    v1 = root_fdt("7.0")
    assert profile_for_fdt(v1, True).name == "7.0"
    assert profile_for_fdt(v1, False).name == "6.18"
    # the compatible cut off with the strings: the oldest release that cuts out/fdt short
    assert profile_for_fdt(v1[:60], True).name == "7.0"
    assert profile_for_fdt(v1[:60], True, ["bootmem_phys"]).name == "7.4"
    assert profile_for_fdt(b"kho-v9\0") is None
    assert scratch_files_in(["bootmem_len", "bootmem_phys", "fdt"]) == ("bootmem_phys",
                                                                        "bootmem_len")
    assert scratch_files_in([]) == ("scratch_phys", "scratch_len")


# -- no module but the table names a profile or parses a release --------------------------

def _offences(path: Path):
    names = set(PROFILES)
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr)}
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings:
            if n.value in names:
                yield f"line {n.lineno}: names profile {n.value!r}"
            elif re.search(r"\\d\+?\)?\\\.", n.value):
                yield f"line {n.lineno}: a version pattern {n.value!r}"
        elif isinstance(n, ast.Compare):
            for side in [n.left] + n.comparators:
                if isinstance(side, ast.Attribute) and side.attr == "name" and \
                        "prof" in ast.unparse(side.value):
                    yield f"line {n.lineno}: compares a profile's name"
                if isinstance(side, ast.Tuple) and len(side.elts) == 2 and all(
                        isinstance(e, ast.Constant) and isinstance(e.value, int)
                        for e in side.elts):
                    yield f"line {n.lineno}: compares a version {ast.unparse(side)}"


MODULES = sorted(p for p in ROOT.rglob("*.py") if p != ROOT / "kernel" / "profile.py")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_but_the_table_names_a_profile_or_parses_a_release(path):
    assert list(_offences(path)) == []


def test_the_guard_sees_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('if kho.profile.name == "6.16":\n    pass\n'
                   'ok = ver < (6, 19)\n'
                   'm = re.match(r"(\\d+)\\.(\\d+)", release)\n'
                   'get_profile("7.0")\n')
    assert sorted(o.split(":")[0] for o in _offences(bad)) == [
        "line 1", "line 1", "line 3", "line 4", "line 5"]
    assert list(_offences(ROOT / "kernel" / "profile.py")) != []


# -- a new release is one entry ------------------------------------------------------------

def new_profile():
    """A release only this test knows: 7.4 with another compatible and scratch file names."""
    return dataclasses.replace(PROFILES["7.4"], name="9.9", first=(9, 9), compatible="kho-v9",
                               scratch_files=("handover_phys", "handover_len"),
                               scratch_param="kho_handover")


def test_a_profile_only_the_table_knows_boots_and_kexecs(monkeypatch):
    monkeypatch.setitem(PROFILES, "9.9", new_profile())
    assert profile_mod.release_profile_name("9.9.1") == "9.9"
    m = Machine("kho=on kho_handover=2M,8M,2M reserve_mem=1M:4096:r9",
                MachineConfig(memory=G, release="9.9.1"))
    assert m.profile.name == "9.9" and m.status()["abi"] == "9.9"
    assert b'kho-v9\0' in m.kho_out.root_fdt()
    assert m.scratch[0][1] == 2 << 20
    t = Tree(m)
    assert sorted(n.name for n in t.listdir(t.resolve("kho/out"))) == [
        "fdt", "handover_len", "handover_phys", "sub_fdts"]
    m.kexec_load()
    ho = Handover.loads(m.kexec_exec().dumps())
    n = Machine(ho.cmdline, MachineConfig(**ho.config), ho, release=ho.release)
    lines = [x.text for x in n.dmesg]
    assert n.profile.name == "9.9" and n.kho_in is not None
    assert "KHO: found kexec handover data." in lines
    assert "Revived memory reservation 'r9' from KHO" in lines
    assert "KHO: exec from: 9.9.1 (count 1)" in lines
    # and the releases before it judge its handover by their own compatible
    m2 = Machine("kho=on", MachineConfig(memory=G, abi="9.9"))
    m2.kexec_load(abi="7.4")
    ho = m2.kexec_exec()
    n = Machine(ho.cmdline, MachineConfig(**ho.config), ho, release=ho.release)
    assert n.kho_in is None
    assert [x.text for x in n.dmesg][1] == "KHO: disabling KHO revival"


# -- the kernels around the table ----------------------------------------------------------

def test_a_kernel_before_616_has_no_kho():
    m = Machine("kho=on kho_scratch=16M reserve_mem=1M:4096:r", MachineConfig(memory=G,
                                                                         release="6.12.0"))
    assert m.profile is None and not m.kho_enable and m.kho_out is None
    t = Tree(m)
    assert [n.name for n in t.listdir(t.root)] == []
    st = m.status()
    assert (st["abi"], st["finalized"], st["preserve_bits"], st["release"]) == (
        None, None, None, "6.12.0")
    assert m.ignored == ["kho=on: ignored, this kernel has no KHO (it came in v6.16)",
                         "kho_scratch=16M: ignored, not a parameter of this kernel"]
    assert get_profile(NO_KHO) is None


def test_kexec_picks_the_next_kernel_by_its_release():
    m = Machine("kho=on", MachineConfig(memory=G, abi="7.1"))
    for release, abi in [("7.2.3", "7.2"), ("7.1.5", "7.1"), ("my-kernel", "7.1"),
                         ("6.12.0", None)]:
        img = m.kexec_load(release=release)
        assert (img.release, img.abi) == (release, abi or NO_KHO)
    # --abi is the override: the release is then only uname -r
    assert m.kexec_load(release="7.2.3", abi="7.0").abi == "7.0"
    m.kexec_load(release="6.12.0")
    ho = m.kexec_exec()
    n = Machine(ho.cmdline, MachineConfig(**ho.config), ho, release=ho.release)
    assert n.profile is None and n.kho_in is None and n.release == "6.12.0"
    assert [x.text for x in n.dmesg if x.text.startswith("KHO")] == []
    # and back into a KHO kernel: a cold boot
    n.kexec_load(release="7.1.5")
    ho = n.kexec_exec()
    n2 = Machine(ho.cmdline, MachineConfig(**ho.config), ho, release=ho.release)
    assert n2.profile.name == "7.1" and n2.kho_in is None and n2.kho_out is not None


def test_74_takes_kho_bootmem_and_ignores_kho_scratch():
    m = Machine("kho=on kho_bootmem=4M,16M,4M", MachineConfig(memory=G, abi="7.4"))
    assert [s for _, s in m.scratch] == [4 << 20, 16 << 20, 4 << 20]
    assert m.ignored == []
    m = Machine("kho=on kho_scratch=4M,16M,4M", MachineConfig(memory=G, abi="7.4"))
    assert [s for _, s in m.scratch] != [4 << 20, 16 << 20, 4 << 20]
    assert m.ignored == ["kho_scratch=4M,16M,4M: ignored, not a parameter of this kernel "
                         "(it takes kho_bootmem=)"]
    m = Machine("kho=on kho_bootmem=4M,16M,4M", MachineConfig(memory=G, abi="7.2"))
    assert m.ignored == ["kho_bootmem=4M,16M,4M: ignored, not a parameter of this kernel "
                         "(it takes kho_scratch=)"]


@pytest.mark.parametrize("abi", ["7.2", "7.4"])
def test_72_and_74_root_fdt_is_71s_with_kho_v4(abi):
    """The same boot gives the same FDT byte for byte but the compatible: kho_init builds it
    as 7.1 does and memblock adds its subtree in place, before kexec-metadata."""
    cmdline = "kho=on reserve_mem=1M:4096:test_resv"
    ref = Machine(cmdline, MachineConfig(memory=G, abi="7.1"))
    m = Machine(cmdline, MachineConfig(memory=G, abi=abi))
    want = ref.kho_out.root_fdt()
    assert len(want) == 293 and want.count(b"kho-v3\0") == 1
    assert m.kho_out.root_fdt() == want.replace(b"kho-v3\0", b"kho-v4\0")
    assert [(b.name, b.size) for b in m.kho_out.blobs("out")] == [("fdt", 233)]
    assert [(b.name, b.size) for b in m.kho_out.blobs("sub_fdts")] == [
        ("kexec-metadata", 73), ("memblock", 214)]
    assert [n for n, _ in subnodes(m.kho_out.root_fdt(), 0)] == ["memblock", "kexec-metadata"]


class _Mem:
    """Simulated memory as khofs dump reads it (a mount's MemorySource)."""

    def __init__(self, m):
        self.m, self.size, self.bits = m, m.mem.size, m.profile.preserve_bits

    def read(self, phys, size):
        return self.m.mem.read(phys, size)


def test_dump_takes_the_root_binding_from_the_table():
    from khofs.devicetree.dump import decode
    m = Machine("kho=on reserve_mem=1M:4096:r", MachineConfig(memory=G, abi="7.4"))
    p = m.pages.alloc_range(4)
    m.kho_out.preserve_pages(p, 4 * 4096)
    blob = m.kho_out.root_fdt()
    d = decode(blob, "out/fdt", _Mem(m))
    assert (d["compatible"], d["problems"]) == ("kho-v4", [])
    assert d["memory_map"]["format"] == "radix-tree" and d["memory_map"]["error"] is None
    covered = sum(max(0, min(r["start"] + r["size"], p + 4 * 4096) - max(r["start"], p))
                  for r in d["memory_map"]["ranges"])
    assert covered == 4 * 4096
    assert [c["blob"]["kind"] for c in d["root"]["children"]] == ["fdt", "kexec-metadata"]
    # a kho-v4 child is bound as kho-v3's: blob-size is required
    f = libfdt.Fdt(bytearray(blob) + bytearray(64))
    libfdt.fdt_open_into(f._fdt, f._fdt, len(f._fdt))
    f.delprop(f.path_offset("/memblock"), "blob-size")
    d = decode(bytes(f.as_bytearray()), "out/fdt", None)
    assert "memblock: missing required property 'blob-size'" in d["problems"]
    d = decode(blob.replace(b"kho-v4\0", b"kho-v9\0"), "out/fdt", None)
    assert d["problems"] == ["root: compatible 'kho-v9' is not kho-v1 (6.16, 6.18, 7.0), "
                             "kho-v3 (7.1) nor kho-v4 (7.2, 7.4): every emulated kernel "
                             "rejects it"]
