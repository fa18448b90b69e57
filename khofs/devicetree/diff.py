"""Device-tree text out, and the structural difference of two FDTs, on the fdt package.

pylibfdt checks a blob the way the kernel would before the fdt package reads it; the fdt
package gives the tree, its DTS text and the comparison. Nothing here prints.
"""

import os

import fdt
import libfdt

# Properties that hold a physical address, and so move between boots (KHO-SPEC §3, §9).
ADDRESS_PROPERTIES = ("fdt", "preserved-data", "preserved-memory-map")
RESERVE_MEM_COMPATIBLE = "reserve-mem-v1"


class DiffError(Exception):
    """A side that cannot be compared: unreadable, or not an FDT."""


def _shared_entries() -> list:
    # fdt 0.3.3 gives every FDT() made without entries one shared default list; parse_dtb
    # and diff append to it, so each caller must take back what it added.
    return fdt.FDT.__init__.__defaults__[1]


def check(blob: bytes, where: str) -> None:
    """Raise DiffError unless blob is a whole, well-formed FDT (libfdt's full check)."""
    if len(blob) >= 8 and blob[:4] == b"\xd0\x0d\xfe\xed":
        size = int.from_bytes(blob[4:8], "big")
        if size > len(blob):
            from .whole import guess_abi
            hint = f" (a {guess_abi(blob)} kernel sizes out/fdt once, when it makes the file)" \
                if where.endswith("out/fdt") else ""
            raise DiffError(f"{where}: truncated FDT: its header says {size} bytes, "
                            f"{len(blob)} read{hint}")
    err = libfdt.fdt_check_full(bytearray(blob), len(blob))
    if err:
        raise DiffError(f"{where}: not an FDT ({libfdt.fdt_strerror(err)})")


def is_fdt(blob: bytes) -> bool:
    """Whether blob passes libfdt's full check."""
    return libfdt.fdt_check_full(bytearray(blob), len(blob)) == 0


def parse(blob: bytes, where: str) -> fdt.FDT:
    """The fdt package's tree of a checked blob, with its own reserve map."""
    check(blob, where)
    shared = _shared_entries()
    n = len(shared)
    try:
        tree = fdt.parse_dtb(bytes(blob))
    except Exception as e:      # the fdt package raises bare Exceptions on what it cannot walk
        raise DiffError(f"{where}: the fdt package cannot read it: {e}") from None
    finally:
        entries = shared[n:]
        del shared[n:]
    tree.entries = entries
    return tree


def dts_text(blob: bytes, where: str) -> str:
    """Plain DTS text of a blob, as the fdt package writes it."""
    return parse(blob, where).to_dts()


def _value(prop) -> str | None:
    text = prop.to_dts(tabsize=0).strip().rstrip(";")
    head = f"{prop.name} = "
    return text[len(head):] if text.startswith(head) else None


def _join(path: str, name: str) -> str:
    return path.rstrip("/") + "/" + name


def _address_masked(tree: fdt.FDT, path: str, name: str) -> bool:
    if name in ADDRESS_PROPERTIES:
        return True
    if name != "start":
        return False
    compat = tree.get_property("compatible", path) if tree.exist_node(path) else None
    return compat is not None and RESERVE_MEM_COMPATIBLE in (compat.data or [])


def diff_trees(a: fdt.FDT, b: fdt.FDT, ignore_addresses: bool = False) -> list[dict]:
    """Nodes, properties and reserve-map entries added, removed and changed from a to b."""
    changes = []

    def add(change, kind, path, prop=None, old=None, new=None):
        changes.append({"change": change, "kind": kind, "path": path, "property": prop,
                        "old": old, "new": new})

    for e in a.entries:
        if e not in b.entries:
            add("removed", "memreserve", "/memreserve/", old=f"{e['address']:#x} {e['size']:#x}")
    for e in b.entries:
        if e not in a.entries:
            add("added", "memreserve", "/memreserve/", new=f"{e['address']:#x} {e['size']:#x}")

    shared = _shared_entries()
    n = len(shared)
    try:
        _, only_a, only_b = fdt.diff(a, b)
    finally:
        del shared[n:]

    for path, nodes, props in only_a.walk():
        for node in nodes:
            if not b.exist_node(_join(path, node.name)):
                add("removed", "node", _join(path, node.name))
        for p in props:
            if b.exist_node(path) and b.exist_property(p.name, path):
                q = b.get_property(p.name, path)
                if ignore_addresses and _address_masked(a, path, p.name) \
                        and _address_masked(b, path, p.name):
                    continue
                add("changed", "property", path, p.name, _value(p), _value(q))
            else:
                add("removed", "property", path, p.name, old=_value(p))
    for path, nodes, props in only_b.walk():
        for node in nodes:
            if not a.exist_node(_join(path, node.name)):
                add("added", "node", _join(path, node.name))
        for p in props:
            if not (a.exist_node(path) and a.exist_property(p.name, path)):
                add("added", "property", path, p.name, new=_value(p))
    order = {"memreserve": 0, "node": 1, "property": 1}
    changes.sort(key=lambda c: (order[c["kind"]], c["path"], c["property"] or ""))
    return changes


def read_side(path: str) -> dict[str, bytes]:
    """The blobs of one side: a file as {"": blob}; a kho/out or kho/in dir as its fdt and
    sub_fdts/NAME."""
    if not os.path.isdir(path):
        return {"": _read(path)}
    if not os.path.exists(os.path.join(path, "fdt")):
        if os.path.isdir(os.path.join(path, "out")) or os.path.isdir(os.path.join(path, "kho")):
            raise DiffError(f"{path}: holds both sides: name one side of the tree "
                            f"(kho/out, kho/in, or a file in it)")
        raise DiffError(f"{path}: no fdt here (not a kho/out or kho/in directory)")
    blobs = {"fdt": _read(os.path.join(path, "fdt"))}
    sub = os.path.join(path, "sub_fdts")
    if os.path.isdir(sub):
        for name in sorted(os.listdir(sub)):
            blobs[f"sub_fdts/{name}"] = _read(os.path.join(sub, name))
    return blobs


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DiffError(f"{path}: cannot read: {e.strerror}") from None


def diff_paths(a: str, b: str, ignore_addresses: bool = False) -> list[dict]:
    """Changes from side a to side b, each with "blob": the file they are in ("" for two files)."""
    sa, sb = read_side(a), read_side(b)
    if ("" in sa) != ("" in sb):
        sa, sb = {"fdt": sa.get("", sa.get("fdt"))}, {"fdt": sb.get("", sb.get("fdt"))}
    changes = []
    for name in sorted(set(sa) | set(sb)):
        if name not in sb:
            changes.append(_blob_change("removed", name))
            continue
        if name not in sa:
            changes.append(_blob_change("added", name))
            continue
        wa, wb = os.path.join(a, name) if name else a, os.path.join(b, name) if name else b
        if name.startswith("sub_fdts/") and not (is_fdt(sa[name]) and is_fdt(sb[name])):
            # 7.1 sub-blobs need not be FDTs: compare them as bytes.
            if sa[name] != sb[name]:
                c = _blob_change("changed", name)
                c.update(old=f"{len(sa[name])} bytes", new=f"{len(sb[name])} bytes")
                changes.append(c)
            continue
        for c in diff_trees(parse(sa[name], wa), parse(sb[name], wb), ignore_addresses):
            c["blob"] = name or None
            changes.append(c)
    return changes


def _blob_change(change: str, name: str) -> dict:
    return {"blob": name, "change": change, "kind": "blob", "path": None, "property": None,
            "old": None, "new": None}


_SIGN = {"added": "+", "removed": "-", "changed": "~"}


def render(changes: list[dict]) -> list[str]:
    """One line per change: + added, - removed, ~ changed."""
    lines = []
    for c in changes:
        pre = f"{c['blob']}: " if c.get("blob") else ""
        sign = _SIGN[c["change"]]
        if c["kind"] == "blob":
            tail = f" ({c['old']} -> {c['new']})" if c["change"] == "changed" else ""
            lines.append(f"{sign} {c['blob']}{tail}")
        elif c["kind"] == "memreserve":
            lines.append(f"{sign} {pre}/memreserve/ {c['old'] or c['new']}")
        elif c["kind"] == "node":
            lines.append(f"{sign} {pre}{c['path'].rstrip('/')}/")
        else:
            where = _join(c["path"], c["property"])
            if c["change"] == "changed":
                lines.append(f"{sign} {pre}{where} = {c['old']} -> {c['new']}")
            else:
                value = c["old"] if c["change"] == "removed" else c["new"]
                lines.append(f"{sign} {pre}{where}" + (f" = {value}" if value is not None else ""))
    return lines
