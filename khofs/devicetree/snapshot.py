"""khofs snapshots: a kho/ debugfs tree in one file (khofs record), read back by khofs mount
--replay and khofs map. The format is in docs/snapshot-format.md: a tar archive whose first
member is manifest.json, then kho/ with every directory and file (bytes as read() returned
them, modes in the headers), and extra/ for what debugfs did not show but the recording
source could tell.
"""

import io
import json
import os
import tarfile
import time
from dataclasses import dataclass, field

from ..kernel.replay import Recording, RecordingError, plan, profile_of_release

FORMAT = "khofs-snapshot"
VERSION = 1
MANIFEST = "manifest.json"
ROOT_FDT = "root-fdt"         # extra/root-fdt: the whole root FDT when out/fdt shows less
# What a KHO debugfs tree holds; anything else in a recorded tree is kept but not replayed.
KHO_FILES = ("out/finalize", "out/fdt", "out/scratch_phys", "out/scratch_len", "in/fdt")
KHO_DIRS = ("", "out", "in", "out/sub_fdts", "in/sub_fdts")


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
            for d in dirs:
                tree.modes[_join(rel, d)] = os.lstat(os.path.join(top, d)).st_mode & 0o7777
            for n in sorted(names):
                full = os.path.join(top, n)
                st = os.lstat(full)
                if not os.path.isfile(full) or os.path.islink(full):
                    raise SnapshotError(f"{full}: not a regular file (a kho/ tree has only "
                                        "files and directories)")
                with open(full, "rb") as f:
                    tree.files[_join(rel, n)] = f.read()
                tree.modes[_join(rel, n)] = st.st_mode & 0o7777
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
    fdt = tree.extra.get(ROOT_FDT) or tree.read("out/fdt")
    if fdt is None:
        if tree.read("out/finalize") is not None:
            raise SnapshotError(f"{tree.where('out/fdt')} is missing: KHO hands nothing over "
                                "until it is finalized; run echo 1 > kho/out/finalize, then "
                                "record again")
        raise SnapshotError(f"{tree.where('out/fdt')} is missing: a 7.x kernel shows it only "
                            "after a cold boot, so this kernel's handover cannot be recorded "
                            "from debugfs")
    blobs = {n: tree.read(f"out/sub_fdts/{n}") for n in tree.listdir("out/sub_fdts")
             if tree.read(f"out/sub_fdts/{n}") is not None}
    notes = [f"kho/{p} is not part of a KHO debugfs tree: kept, not replayed"
             for p in sorted(tree.modes) if not _is_kho_path(p)]
    rec = Recording(fdt=bytes(fdt), blobs=blobs, scratch=_scratch(tree), abi=_abi(tree, fdt),
                    release=tree.meta.get("release"), cmdline=tree.meta.get("cmdline"),
                    memory=tree.meta.get("memory"), nodes=tree.meta.get("nodes"),
                    source=source, notes=notes)
    try:
        plan(rec)
    except RecordingError as e:
        msg = tree.where(str(e)) if str(e).startswith("out/") else str(e)
        if str(e).startswith("out/fdt: truncated"):
            msg += ("; a 7.x kernel fixes out/fdt's size when it makes the file, and the rest "
                    "of its FDT is not in debugfs")
        raise SnapshotError(msg) from None
    return rec


def _is_kho_path(p: str) -> bool:
    if p in KHO_FILES or p in KHO_DIRS:
        return True
    d, _, name = p.rpartition("/")
    return d in ("out/sub_fdts", "in/sub_fdts") and "/" not in name


def _scratch(tree: KhoTree) -> list:
    cols = []
    for name in ("scratch_phys", "scratch_len"):
        data = tree.read(f"out/{name}")
        if data is None:
            raise SnapshotError(f"{tree.where('out/' + name)} is missing")
        try:
            cols.append([int(x, 16) for x in data.decode().split()])
        except (UnicodeDecodeError, ValueError):
            raise SnapshotError(f"{tree.where('out/' + name)}: not one hex number a line") \
                from None
    if len(cols[0]) != len(cols[1]):
        raise SnapshotError(f"{tree.where('out/scratch_phys')} lists {len(cols[0])} areas, "
                            f"scratch_len {len(cols[1])}")
    return list(zip(*cols))


def _abi(tree: KhoTree, fdt: bytes) -> str:
    """The recorded kernel's profile: as the source said, by its release, or by the tree."""
    if tree.meta.get("abi"):
        return tree.meta["abi"]
    by_release = profile_of_release(tree.meta.get("release") or "")
    if by_release:
        return by_release
    return "7.1" if b"kho-v3\0" in fdt else "6.18"


# -- the file -----------------------------------------------------------------------------
def save(tree: KhoTree, path: str) -> None:
    """Write the snapshot atomically: a complete file or none at all."""
    manifest = dict(tree.meta, format=FORMAT, version=VERSION,
                    members=[f"kho/{p}" if p else "kho" for p in sorted(tree.modes)] +
                    [f"extra/{n}" for n in sorted(tree.extra)])
    now = int(time.time())
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            _add(tar, MANIFEST, 0o644, now, (json.dumps(manifest, indent=2) + "\n").encode())
            for p in sorted(tree.modes):
                name = f"kho/{p}" if p else "kho"
                _add(tar, name, tree.modes[p], now, tree.files.get(p))
            for name in sorted(tree.extra):
                _add(tar, f"extra/{name}", 0o400, now, tree.extra[name])
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise SnapshotError(f"cannot write {path}: {e.strerror}") from None


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
            for m in members[1:]:
                _member(path, tar, m, tree)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise SnapshotError(f"{path}: damaged snapshot ({e})") from None
    if "" not in tree.modes:
        raise SnapshotError(f"{path}: the snapshot holds no kho/ directory")
    # A tar archive cut at a member boundary reads without error: the list says what is gone.
    held = {f"kho/{p}" if p else "kho" for p in tree.modes} | {f"extra/{n}" for n in tree.extra}
    lost = [m for m in manifest.get("members", []) if m not in held]
    if lost:
        raise SnapshotError(f"{path}: damaged snapshot ({lost[0]} is listed in {MANIFEST} but "
                            "not in the archive: a truncated or edited file?)")
    tree.meta = {k: manifest[k] for k in ("source", "release", "cmdline", "abi", "memory", "nodes", "recorded")
                 if k in manifest}
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
    return manifest


def _member(path, tar, m, tree: KhoTree) -> None:
    name = m.name.rstrip("/")
    top, _, rest = name.partition("/")
    if top == "extra" and rest and "/" not in rest and m.isfile():
        tree.extra[rest] = tar.extractfile(m).read()
        return
    if top != "kho" or ".." in name.split("/") or not (m.isfile() or m.isdir()):
        raise SnapshotError(f"{path}: unexpected member {m.name!r} (a snapshot holds "
                            f"{MANIFEST}, kho/ and extra/, files and directories only)")
    tree.modes[rest] = m.mode & 0o7777
    if m.isfile():
        tree.files[rest] = tar.extractfile(m).read()
