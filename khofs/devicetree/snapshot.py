"""khofs snapshots: a kho/ debugfs tree in one file (khofs record), read back by khofs mount
--replay and khofs map. The format is in docs/snapshot-format.md: a tar archive whose first
member is manifest.json, then kho/ with every directory and file (bytes as read() returned
them, modes in the headers), extra/ for what debugfs did not show but the recording source
could tell, and an end marker that a cut-short file lacks.
"""

import io
import json
import os
import re
import tarfile
import tempfile
import time
from dataclasses import dataclass, field

from ..kernel.profile import (DEFAULT_PROFILE, NO_KHO, PROFILES, get_profile, profile_for_fdt,
                              release_profile_name, scratch_file_pairs, scratch_files_in)
from ..kernel.fdt import FDT_HEADER, totalsize
from ..kernel.replay import Recording, RecordingError
from ..kernel.rootfdt import rebuild

FORMAT = "khofs-snapshot"
VERSION = 1
MANIFEST = "manifest.json"
END = "khofs-snapshot.end"      # the last member: tar itself does not notice a cut at a member
ROOT_FDT = "root-fdt"           # extra/root-fdt: the whole root FDT when debugfs shows less
EXTRA = (ROOT_FDT,)
# What a KHO debugfs tree holds; anything else in a recorded tree is kept but not replayed.
KHO_FILES = ("out/finalize", "out/fdt", "in/fdt")      # and each release's scratch files
KHO_DIRS = ("", "out", "in", "out/sub_fdts", "in/sub_fdts")
# The manifest's keys a reader uses, and what each must be.
META = {"source": dict, "release": str, "cmdline": str, "abi": str, "memory": int,
        "nodes": int, "recorded": str}
HEX_LINE = re.compile(r"0x[0-9a-f]{1,16}")        # out/scratch_*: "0x%llx\n" each


class SnapshotError(Exception):
    """A snapshot or kho/ tree that cannot be recorded or read; the message says why."""


@dataclass
class KhoTree:
    """A kho/ tree in memory: paths relative to kho/ ("out/fdt"), "" for kho/ itself."""
    files: dict = field(default_factory=dict)      # path -> bytes
    modes: dict = field(default_factory=dict)      # path -> st_mode & 0o7777, files and dirs
    extra: dict = field(default_factory=dict)      # name -> bytes (extra/NAME)
    meta: dict = field(default_factory=dict)       # the manifest's source, release, cmdline, abi
    origin: str = "kho"                            # how messages name kho/: its path
    # path -> mtime in ns: a debugfs file's is its creation time, the order the kernel added
    # its subtree in (cp -a keeps it, the snapshot too)
    mtimes: dict = field(default_factory=dict)

    def where(self, path: str) -> str:
        """How a message names the file at path."""
        return f"{self.origin}/{path}" if path else self.origin

    def read(self, path: str) -> bytes | None:
        """A file's bytes, or None."""
        return self.files.get(path)

    def isdir(self, path: str) -> bool:
        """Whether path is a directory of the tree."""
        return path in self.modes and path not in self.files

    def listdir(self, path: str) -> list:
        """The names in a directory, sorted."""
        prefix = path + "/" if path else ""
        return sorted({p[len(prefix):].split("/")[0] for p in self.modes
                       if p.startswith(prefix) and p != path and p})


def read_dir(kho: str) -> KhoTree:
    """Every directory and file below kho, files byte for byte as read() returns them."""
    tree = KhoTree(origin=kho.rstrip("/") or "/")
    try:
        tree.modes[""] = os.stat(kho).st_mode & 0o7777
        for top, dirs, names in os.walk(kho, onerror=_raise):
            dirs.sort()
            rel = os.path.relpath(top, kho)
            rel = "" if rel == "." else rel
            for n in dirs + sorted(names):
                full = os.path.join(top, n)
                st = os.lstat(full)
                if os.path.islink(full) or not (os.path.isdir(full) or os.path.isfile(full)):
                    raise SnapshotError(f"{full}: not a regular file or directory (a kho/ "
                                        "tree has only those)")
                tree.modes[_join(rel, n)] = st.st_mode & 0o7777
                tree.mtimes[_join(rel, n)] = st.st_mtime_ns
                if n in names:
                    with open(full, "rb") as f:
                        tree.files[_join(rel, n)] = f.read()
    except OSError as e:
        raise SnapshotError(f"cannot read {e.filename or kho}: {e.strerror}") from None
    return tree


def _raise(e):
    raise e


def _join(rel, name):
    return f"{rel}/{name}" if rel else name


def recording(tree: KhoTree, source: str = "") -> Recording:
    """The outgoing side of a recorded tree, checked as a handover; SnapshotError says why not."""
    if not tree.isdir("out"):
        raise SnapshotError(f"{tree.where('out')} is missing: not a KHO debugfs tree")
    shown, whole = tree.read("out/fdt"), tree.extra.get(ROOT_FDT)
    if shown is None and whole is None:
        if tree.read("out/finalize") is not None:
            raise SnapshotError(f"{tree.where('out/fdt')} is missing: KHO hands nothing over "
                                "until it is finalized; run echo 1 > kho/out/finalize, then "
                                "record again")
        raise SnapshotError(f"{tree.where('out/fdt')} is missing: a 7.x kernel shows it only "
                            "after a cold boot, so this kernel's handover cannot be recorded "
                            "from debugfs")
    if shown is not None and whole is not None and not whole.startswith(shown):
        raise SnapshotError(f"{tree.where('out/fdt')} is not the start of extra/{ROOT_FDT}, "
                            "the whole root FDT recorded with it (one of them was edited)")
    fdt = whole if whole is not None else shown
    blobs = {n: tree.read(f"out/sub_fdts/{n}") for n in tree.listdir("out/sub_fdts")
             if tree.read(f"out/sub_fdts/{n}") is not None}
    notes = [f"{p} is not part of a KHO debugfs tree: kept, not replayed"
             for p in sorted(tree.modes) if not _is_kho_path(p)]
    abi = _abi(tree, fdt)
    unplaced, rebuilt_from = [], None
    if whole is None and _cut_short(shown) and get_profile(abi).fdt_at_boot:
        # 7.x: out/fdt keeps the size the FDT had when kho_init made the file.
        try:
            fdt, unplaced = rebuild(shown, blobs, get_profile(abi), creation_order(tree))
        except ValueError as e:
            raise SnapshotError(
                f"{tree.where('out/fdt')}: truncated FDT ({len(shown)} of the "
                f"{totalsize(shown)} bytes its header says), and khofs cannot rebuild the rest "
                f"the {abi} kernel's way: {e}") from None
        rebuilt_from = len(shown)
    rec = Recording(fdt=bytes(fdt), blobs=blobs, scratch=_scratch(tree), abi=abi,
                    release=tree.meta.get("release"), cmdline=tree.meta.get("cmdline"),
                    memory=tree.meta.get("memory"), nodes=tree.meta.get("nodes"),
                    source=source, notes=notes, unplaced=unplaced, shown=rebuilt_from)
    try:
        rec.plan
    except RecordingError as e:
        raise SnapshotError(tree.where(e.path) + e.rest if e.path else e.rest) from None
    return rec


def creation_order(tree: KhoTree) -> dict | None:
    """name -> creation time of each out/sub_fdts file, if they all tell one apart."""
    made = {n: tree.mtimes.get(f"out/sub_fdts/{n}") for n in tree.listdir("out/sub_fdts")}
    if None in made.values() or len(set(made.values())) != len(made):
        return None
    return made


def _cut_short(fdt: bytes) -> bool:
    return len(fdt) >= FDT_HEADER.size and totalsize(fdt) > len(fdt)


def _is_kho_path(p: str) -> bool:
    if p in KHO_FILES or p in KHO_DIRS:
        return True
    if any(p in (f"out/{a}", f"out/{b}") for a, b in scratch_file_pairs()):
        return True
    d, _, name = p.rpartition("/")
    return d in ("out/sub_fdts", "in/sub_fdts") and "/" not in name


def _scratch(tree: KhoTree) -> list:
    cols = []
    names = scratch_files_in(tree.listdir("out"))
    for name in names:
        data = tree.read(f"out/{name}")
        if data is None:
            raise SnapshotError(f"{tree.where('out/' + name)} is missing")
        lines = data.decode(errors="replace").split("\n")
        if lines[-1] != "" or not all(HEX_LINE.fullmatch(x) for x in lines[:-1]):
            raise SnapshotError(f"{tree.where('out/' + name)}: not one 0x-prefixed hex number "
                                "a line, as the kernel prints them")
        cols.append([int(x, 16) for x in lines[:-1]])
    if len(cols[0]) != len(cols[1]):
        raise SnapshotError(f"{tree.where('out/' + names[0])} lists {len(cols[0])} areas, "
                            f"{names[1]} {len(cols[1])}")
    return list(zip(*cols))


def _abi(tree: KhoTree, fdt: bytes) -> str:
    """The recorded kernel's profile: as the source said, by its release, or by the tree (a
    short out/fdt is 6.19+'s; 6.16-6.18 make the file when the FDT is complete)."""
    if tree.meta.get("abi"):
        return tree.meta["abi"]
    by_release = release_profile_name(tree.meta.get("release"))
    if by_release not in (None, NO_KHO):
        return by_release
    # 6.16-6.18 make out/fdt of the FDT's size when it is complete; 6.19+ keep the size it
    # had at boot while the FDT grows (or shrinks, a subtree removed).
    shown = tree.read("out/fdt")
    short = shown is not None and len(shown) >= FDT_HEADER.size and totalsize(shown) != len(shown)
    prof = profile_for_fdt(fdt, short, tree.listdir("out"))
    return prof.name if prof is not None else DEFAULT_PROFILE


def not_from(tree, release: str) -> str | None:
    """Why the tree cannot be the kho/ of a kernel whose uname -r is release, or None."""
    from ..kernel.kho_fdt import KEXEC_METADATA
    from ..kernel.profile import compatibles
    abi = release_profile_name(release)
    if abi in (None, NO_KHO):
        return None
    prof = get_profile(abi)
    has_finalize = tree.read("out/finalize") is not None
    if has_finalize != prof.has_finalize:
        return (f"its out/ {'has' if has_finalize else 'has no'} finalize file, which a "
                f"{release} kernel (ABI {abi}) {'does not have' if has_finalize else 'has'}")
    fdt = tree.read("out/fdt") or b""
    other = [c for c in compatibles() if c != prof.compatible and c.encode() + b"\0" in fdt]
    if other and prof.compatible.encode() + b"\0" not in fdt:
        return f"its out/fdt is {other[0]}, which a {release} kernel (ABI {abi}) does not write"
    md = tree.read("out/sub_fdts/kexec-metadata")
    if md is not None and len(md) >= KEXEC_METADATA.size:
        named = KEXEC_METADATA.unpack_from(md)[1].split(b"\0")[0].decode(errors="replace")
        if named != release:
            return f"its kexec-metadata blob names release {named}"
    return None


# -- the file -----------------------------------------------------------------------------
def save(tree: KhoTree, path: str) -> None:
    """Write the snapshot atomically and readable by its owner only (debugfs is root's): a
    complete file or none at all."""
    manifest = dict(tree.meta, format=FORMAT, version=VERSION)
    now = int(time.time())
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".",
                                   dir=os.path.dirname(os.path.abspath(path)))
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w",
                                                    format=tarfile.PAX_FORMAT) as tar:
            _add(tar, MANIFEST, 0o644, now, (json.dumps(manifest, indent=2) + "\n").encode())
            for p in sorted(tree.modes):
                mtime = tree.mtimes[p] / 1e9 if p in tree.mtimes else now
                _add(tar, f"kho/{p}" if p else "kho", tree.modes[p], mtime, tree.files.get(p))
            for name in sorted(tree.extra):
                _add(tar, f"extra/{name}", 0o400, now, tree.extra[name])
            _add(tar, END, 0o644, now, b"")
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(e, OSError):
            raise SnapshotError(f"cannot write {path}: {e.strerror}") from None
        raise


def _add(tar, name, mode, mtime, data):
    info = tarfile.TarInfo(name)
    info.mode, info.mtime = mode, mtime
    if data is None:
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    else:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def load(path: str) -> KhoTree:
    """A snapshot file read back; SnapshotError names what is wrong with it."""
    try:
        tar = tarfile.open(path, "r:*")
    except OSError as e:
        raise SnapshotError(f"cannot read {path}: {e.strerror}") from None
    except tarfile.TarError:
        raise SnapshotError(f"{path}: not a khofs snapshot (not a tar archive)") from None
    tree = KhoTree(origin=f"{path}: kho")
    with tar:
        try:
            members = tar.getmembers()
            if not members or members[0].name != MANIFEST:
                raise SnapshotError(f"{path}: not a khofs snapshot (no {MANIFEST} first)")
            manifest = _manifest(path, tar.extractfile(members[0]).read())
            if not any(m.name == END for m in members):
                raise SnapshotError(f"{path}: damaged snapshot (no {END} member: the file was "
                                    "cut short)")
            for m in members[1:]:
                _member(path, tar, m, tree)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise SnapshotError(f"{path}: damaged snapshot ({e})") from None
    if "" not in tree.modes:
        raise SnapshotError(f"{path}: the snapshot holds no kho/ directory")
    tree.meta = {k: manifest[k] for k in META if manifest.get(k) is not None}
    return tree


def _manifest(path, data) -> dict:
    try:
        manifest = json.loads(data)
    except ValueError:
        raise SnapshotError(f"{path}: {MANIFEST} is not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SnapshotError(f"{path}: not a khofs snapshot ({MANIFEST} has no "
                            f"format \"{FORMAT}\")")
    if manifest.get("version") != VERSION:
        raise SnapshotError(f"{path}: snapshot format version {manifest.get('version')!r} is "
                            f"not one this khofs reads (it reads version {VERSION}); record "
                            "the tree again with this khofs")
    for key, kind in META.items():
        val = manifest.get(key)
        if val is not None and (not isinstance(val, kind) or isinstance(val, bool) or
                                (kind is int and val <= 0)):
            raise SnapshotError(f"{path}: {MANIFEST}: {key} must be "
                                f"{'a positive number' if kind is int else kind.__name__}")
    if manifest.get("abi") is not None and manifest["abi"] not in PROFILES:
        raise SnapshotError(f"{path}: {MANIFEST}: abi {manifest['abi']!r} is not a profile "
                            f"khofs knows ({', '.join(PROFILES)})")
    return manifest


def _member(path, tar, m, tree: KhoTree) -> None:
    name = m.name.rstrip("/")
    top, _, rest = name.partition("/")
    if name == END or (name == "extra" and m.isdir()):
        return
    if top == "extra" and rest in EXTRA and m.isfile():
        tree.extra[rest] = tar.extractfile(m).read()
        return
    if top != "kho" or ".." in name.split("/") or not (m.isfile() or m.isdir()):
        raise SnapshotError(f"{path}: unexpected member {m.name!r} (a snapshot holds "
                            f"{MANIFEST}, kho/, extra/{'|'.join(EXTRA)} and {END}; files and "
                            "directories only)")
    tree.modes[rest] = m.mode & 0o7777
    tree.mtimes[rest] = int(m.mtime * 1e9)
    if m.isfile():
        tree.files[rest] = tar.extractfile(m).read()
