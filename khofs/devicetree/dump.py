"""Decode and check KHO FDTs: `khofs dump`.

The JSON form (`--json`) is one object per decoded FDT:
  {"path": str, "size": int, "compatible": str|null,
   "header": {"version", "last_comp_version", "totalsize", "off_mem_rsvmap", ...},
   "root": NODE, "memory_map": MAP|null, "problems": [str]}
  NODE = {"name": str, "properties": [{"name": str, "length": int, "hex": str,
          "value": str|int|null, "kind": "string"|"u64"|"u32"|"bytes"}],
          "children": [NODE], "sub_fdt": DECODED|null}
  MAP = {"format": "chunk-list"|"radix-tree", "source": "memory"|"daemon", "chunks": int|null,
         "ranges": [{"order": int, "start": int, "size": int}], "total_bytes": int,
         "error": str|null}   (radix-tree walked in memory also has "tables", "leaves")
  "source": "memory" is the map walked in simulated memory (out/fdt on a mount); "daemon"
  is what the running kernel received (in/fdt on a mount: the old kernel's map pages are
  free memory by then, so khofs asks the daemon, as `khofs map` does).
Each object also has "notes": [str] (how the bytes were obtained, e.g. a short 7.x out/fdt
completed) and "unread": [str] (what could not be read, hence not checked).
`value` is the decoded value: strings as text, 8-byte properties as native-endian (LE) u64
addresses, 4-byte ones as LE u32. `sub_fdt` is the FDT a node's `fdt` (kho-v1) or
`preserved-data` (kho-v3, kho-v4) property points to, decoded the same way, when it can be
read. kho-v3 and kho-v4 children also have "blob": {"size": int|null (blob-size), "read":
int|null (bytes of the blob at hand), "kind": "fdt"|"kexec-metadata"|"raw", "metadata": {"version",
"previous_release", "kexec_count"}|null}.
"""

import struct

import libfdt

from ..kernel.fdt import FDT_HEADER, check_header, tree
from ..kernel.kho_fdt import KEXEC_METADATA, KHO_KEXEC_METADATA_VERSION, KHO_METADATA_NODE_NAME
from ..kernel.memtrack import MapError, walk_memory_map
from ..kernel.profile import compatibles, profiles_of_compatible
from ..kernel.radix import tree_leaves, walk_leaves
from .whole import guess_abi

HEADER_FIELDS = ("magic", "totalsize", "off_dt_struct", "off_dt_strings", "off_mem_rsvmap",
                 "version", "last_comp_version", "boot_cpuid_phys", "size_dt_strings",
                 "size_dt_struct")

# What the KHO bindings (Documentation/core-api/kho/bindings) and the producers define; the
# root FDT's binding is each release's (root_binding).
BINDINGS = {
    "memblock-v1": {"props": {"compatible": "string"}, "required": ["compatible"],
                    "child": {"props": {"compatible": "string", "start": "u64", "size": "u64"},
                              "required": ["compatible", "start", "size"], "children": False,
                              "compatible": "reserve-mem-v1"}},
    "kho-test-v1": {"props": {"compatible": "string", "magic": "u32"},
                    "required": ["compatible", "magic"], "child": None},
}


def root_binding(compatible: str):
    """The KHO root's binding for a release's compatible (kho-v1, kho-v3, ...), or None."""
    prof = next(iter(profiles_of_compatible(compatible)), None)
    if prof is None:
        return None
    child = {prof.sub_prop: "u64"}
    if prof.blob_size:
        child["blob-size"] = "u64"
    return {"props": {"compatible": "string", "preserved-memory-map": "u64"},
            "required": ["compatible", "preserved-memory-map"], "radix": prof.radix,
            "child": {"props": child, "required": list(child), "children": False}}


SIZES = {"u64": 8, "u32": 4}


def _printable_string(data: bytes):
    if data.endswith(b"\0") and len(data) > 1:
        parts = data[:-1].split(b"\0")
        if all(p and all(32 <= c < 127 for c in p) for p in parts):
            return "\0".join(p.decode() for p in parts)
    return None


def _prop(name: str, data: bytes) -> dict:
    s = _printable_string(data)
    if s is not None:
        kind, value = "string", s
    elif len(data) == 8:
        kind, value = "u64", struct.unpack("<Q", data)[0]
    elif len(data) == 4:
        kind, value = "u32", struct.unpack("<I", data)[0]
    else:
        kind, value = "bytes", None
    return {"name": name, "length": len(data), "hex": data.hex(), "value": value, "kind": kind}


class MemorySource:
    """Reads simulated memory through a mount's control socket."""

    def __init__(self, client, size: int, bits: int):
        self.client, self.size, self.bits = client, size, bits

    def read(self, phys: int, size: int) -> bytes:
        """size bytes of simulated memory at phys."""
        return self.client.mem_read(phys, size)


def fdt_error(err: int) -> str:
    """A libfdt error in libfdt's own spelling (FDT_ERR_BADMAGIC), as diff and ctl say it."""
    return libfdt.fdt_strerror(err)


def decode(blob: bytes, path: str, mem: MemorySource | None = None, sub_blobs=None,
           depth: int = 0, memory_map: dict | None = None, map_unread: str | None = None,
           abi: str | None = None) -> dict:
    """Decode one FDT; sub_blobs maps subtree names to their bytes when known. memory_map,
    when given, is the map as the kernel received it (not walked in memory); map_unread says
    why the map cannot be read when there is no memory to walk."""
    out = {"path": path, "size": len(blob), "compatible": None, "header": None, "root": None,
           "memory_map": None, "problems": [], "notes": [], "unread": []}
    err = check_header(blob)
    if err:
        out["problems"].append(f"not a valid FDT ({fdt_error(err)})")
        return out
    hdr = dict(zip(HEADER_FIELDS, FDT_HEADER.unpack_from(blob)))
    out["header"] = hdr
    if hdr["totalsize"] > len(blob):
        hint = f" (a {abi or guess_abi(blob)} kernel sizes out/fdt once, when it makes the " \
            "file)" if path.endswith("out/fdt") else ""
        out["problems"].append(f"truncated: the header says {hdr['totalsize']} bytes, "
                               f"{len(blob)} read{hint}")
        return out
    if hdr["totalsize"] != len(blob):
        out["problems"].append(f"totalsize {hdr['totalsize']} != {len(blob)} bytes read")
    t = tree(blob[:hdr["totalsize"]])
    root = _node(t, mem, sub_blobs or {}, depth, path)
    out["root"] = root
    compat = next((p["value"] for p in root["properties"] if p["name"] == "compatible"), None)
    out["compatible"] = compat
    _check(root, out["problems"])
    rule = root_binding(compat) if isinstance(compat, str) else None
    if rule is not None and memory_map is not None:
        out["memory_map"] = dict(memory_map, format="radix-tree" if rule["radix"]
                                 else "chunk-list")
    elif rule is not None and mem is None and depth == 0:
        why = map_unread or "no khofs daemon to read it from"
        out["unread"].append(f"the preserved-memory map: {why}")
    elif rule is not None and mem is not None:
        pmm = next((p for p in root["properties"] if p["name"] == "preserved-memory-map"), None)
        if pmm is not None and pmm["kind"] == "u64":
            if rule["radix"]:
                out["memory_map"] = _radix_map(mem, pmm["value"])
                if out["memory_map"]["error"]:
                    out["problems"].append(f"memory map: broken radix tree: "
                                           f"{out['memory_map']['error']}")
            else:
                out["memory_map"] = _memory_map(mem, pmm["value"])
    for child in root["children"]:
        if child.get("sub_fdt"):
            out["problems"] += [f"{child['name']}: {p}" for p in child["sub_fdt"]["problems"]]
    return out


def _node(t: dict, mem, sub_blobs, depth, path) -> dict:
    node = {"name": t["name"], "properties": [_prop(n, d) for n, d in t["props"]],
            "children": [_node(c, mem, sub_blobs, depth, path) for c in t["children"]],
            "sub_fdt": None}
    if depth == 0 and any(p["name"] == "preserved-data" for p in node["properties"]):
        _v3_child(node, t["name"], mem, sub_blobs, depth, path)
        return node
    fdt_prop = next((p for p in node["properties"] if p["name"] == "fdt"), None)
    if fdt_prop is not None and fdt_prop["kind"] == "u64" and depth == 0:
        blob = sub_blobs.get(t["name"])
        if blob is None and mem is not None:
            try:
                size = struct.unpack(">I", mem.read(fdt_prop["value"] + 4, 4))[0]
                blob = mem.read(fdt_prop["value"], min(size, 1 << 20)) if size >= 40 else b""
            except OSError:
                blob = None
        if blob is not None:
            node["sub_fdt"] = decode(blob, f"{path}:{t['name']}", mem, None, depth + 1)
    return node


def _v3_child(node: dict, name: str, mem, sub_blobs, depth, path) -> None:
    """A kho-v3 child: the blob at preserved-data, of blob-size bytes, in any format."""
    props = {p["name"]: p for p in node["properties"]}
    pd, bs = props.get("preserved-data"), props.get("blob-size")
    size = bs["value"] if bs is not None and bs["kind"] == "u64" else None
    blob = sub_blobs.get(name)
    if blob is None and mem is not None and pd["kind"] == "u64" and size is not None:
        try:
            blob = mem.read(pd["value"], min(size, 1 << 20))
        except OSError:
            blob = None
    info = {"size": size, "read": None if blob is None else len(blob), "kind": "raw",
            "metadata": None, "problems": []}
    node["blob"] = info
    if blob is None:
        return
    if size is not None and len(blob) != size:
        info["problems"].append(f"blob-size {size} but {len(blob)} bytes read")
    if name == KHO_METADATA_NODE_NAME:
        info["kind"] = "kexec-metadata"
        if len(blob) < 4:
            info["problems"].append(f"kexec-metadata blob too small ({len(blob)} bytes)")
            return
        version = struct.unpack_from("<I", blob)[0]
        md = {"version": version, "previous_release": None, "kexec_count": None}
        info["metadata"] = md
        if version != KHO_KEXEC_METADATA_VERSION:
            info["problems"].append(f"kexec-metadata version {version} not supported "
                                    f"(expected {KHO_KEXEC_METADATA_VERSION})")
        if len(blob) != KEXEC_METADATA.size:
            info["problems"].append(f"kexec-metadata is {len(blob)} bytes, expected "
                                    f"{KEXEC_METADATA.size}")
        if len(blob) >= KEXEC_METADATA.size:
            _, rel, count = KEXEC_METADATA.unpack_from(blob)
            md["previous_release"] = rel[:64].split(b"\0")[0].decode(errors="replace")
            md["kexec_count"] = count
        return
    if check_header(blob) == 0:
        info["kind"] = "fdt"
        fdt_size = struct.unpack_from(">I", blob, 4)[0]
        if size is not None and fdt_size != size:
            info["problems"].append(f"blob-size {size} but the FDT's totalsize is {fdt_size}")
        node["sub_fdt"] = decode(blob[:fdt_size], f"{path}:{name}", mem, None, depth + 1)


def _check(root: dict, problems: list) -> None:
    for child in root["children"]:
        for p in (child.get("blob") or {}).get("problems", []):
            problems.append(f"{child['name']}: {p}")
    compat = next((p for p in root["properties"] if p["name"] == "compatible"), None)
    if compat is None:
        problems.append("root: missing compatible")
        return
    rule = BINDINGS.get(compat["value"]) or (root_binding(compat["value"])
                                             if isinstance(compat["value"], str) else None)
    if rule is None:
        if compat["value"] is not None and compat["value"].startswith("kho-v"):
            known = [f"{c} ({', '.join(p.name for p in profiles_of_compatible(c))})"
                     for c in compatibles()]
            problems.append(f"root: compatible {compat['value']!r} is not "
                            f"{', '.join(known[:-1])} nor {known[-1]}: every emulated kernel "
                            "rejects it")
        return
    _check_props("root", root, rule, problems)
    if rule["child"] is not None:
        for child in root["children"]:
            crule = rule["child"]
            _check_props(child["name"], child, crule, problems)
            want = crule.get("compatible")
            got = next((p["value"] for p in child["properties"] if p["name"] == "compatible"), None)
            if want and got != want:
                problems.append(f"{child['name']}: compatible {got!r}, expected {want!r}")
            if not crule["children"] and child["children"]:
                problems.append(f"{child['name']}: unexpected child nodes")


def _check_props(where: str, node: dict, rule: dict, problems: list) -> None:
    props = {p["name"]: p for p in node["properties"]}
    for name in rule["required"]:
        if name not in props:
            problems.append(f"{where}: missing required property {name!r}")
    for name, p in props.items():
        kind = rule["props"].get(name)
        if kind is None:
            problems.append(f"{where}: unexpected property {name!r}")
        elif kind in SIZES and p["length"] != SIZES[kind]:
            problems.append(f"{where}: {name} is {p['length']} bytes, expected {SIZES[kind]} "
                            f"({kind}, native endian)")


def _radix_map(mem: MemorySource, root: int) -> dict:
    out = {"format": "radix-tree", "source": "memory", "chunks": 0, "tables": 0, "leaves": 0,
           "ranges": [], "total_bytes": 0, "error": None}
    seen = set()
    try:
        if not root:
            raise MapError("the tree root is 0")
        leaves = tree_leaves(mem, root, seen)
        out["leaves"], out["tables"] = len(leaves), len(seen) - len(leaves)
        pending = None
        for run in walk_leaves(mem, leaves):
            if pending and pending[0] == run[0] and pending[1] + pending[2] == run[1]:
                pending = (pending[0], pending[1], pending[2] + run[2])
                continue
            if pending:
                out["ranges"].append({"order": pending[0], "start": pending[1], "size": pending[2]})
            pending = run
        if pending:
            out["ranges"].append({"order": pending[0], "start": pending[1], "size": pending[2]})
        out["total_bytes"] = sum(r["size"] for r in out["ranges"])
    except (MapError, OSError) as e:
        out["error"] = str(e)
    return out


def _memory_map(mem: MemorySource, first: int) -> dict:
    out = {"format": "chunk-list", "source": "memory", "chunks": 0, "ranges": [],
           "total_bytes": 0, "error": None}
    try:
        for order, phys, size in walk_memory_map(mem, first, mem.bits):
            out["ranges"].append({"order": order, "start": phys, "size": size})
            out["total_bytes"] += size
        phys, n = first, 0
        while phys and n < (1 << 20):
            n += 1
            phys = struct.unpack("<Q", mem.read(phys, 8))[0]
        out["chunks"] = n
    except (MapError, OSError) as e:
        out["error"] = str(e)
    return out


def _fmt_size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


def render(d: dict, indent: str = "") -> str:
    """The text form of one decode() result."""
    lines = []
    compat = d["compatible"] or "?"
    lines.append(f"{indent}{d['path']}: FDT {compat}, {d['size']} bytes")
    if d["root"] is not None:
        _render_node(d["root"], indent + "  ", lines, top=True)
    m = d["memory_map"]
    if m is not None and m.get("source") == "daemon":
        lines.append(f"{indent}  memory map: as the kernel received it (from the daemon), "
                     f"{len(m['ranges'])} range(s), {_fmt_size(m['total_bytes'])} preserved")
    elif m is not None and m.get("format") == "radix-tree":
        lines.append(f"{indent}  memory map: radix tree, {m['tables']} table(s), "
                     f"{m['leaves']} leaf bitmap(s), {_fmt_size(m['total_bytes'])} preserved")
    elif m is not None:
        lines.append(f"{indent}  memory map: {m['chunks']} chunk(s), "
                     f"{_fmt_size(m['total_bytes'])} preserved")
    if m is not None:
        for r in m["ranges"]:
            n = r["size"] >> (12 + r["order"])
            lines.append(f"{indent}    order {r['order']:2}: [0x{r['start']:x}, "
                         f"0x{r['start'] + r['size']:x}) {n} block(s), {_fmt_size(r['size'])}")
        if m["error"]:
            lines.append(f"{indent}    error: {m['error']}")
    if indent == "":
        lines += [f"note: {n}" for n in d.get("notes", [])]
        lines += [f"not read: {u}" for u in d.get("unread", [])]
        probs = d["problems"]
        if probs:
            lines.append("problems:")
        elif d.get("unread"):
            lines.append("problems: none in what could be read")
        else:
            lines.append("problems: none")
        lines += [f"  - {p}" for p in probs]
    return "\n".join(lines)


def _render_node(node: dict, indent: str, lines: list, top=False) -> None:
    if not top:
        lines.append(f"{indent}{node['name']} {{")
        indent += "  "
    for p in node["properties"]:
        if p["kind"] == "string":
            v = '"' + p["value"].replace("\0", '", "') + '"'
        elif p["kind"] == "u64":
            v = f"0x{p['value']:x}"
            if p["name"] == "size":
                v += f" ({_fmt_size(p['value'])})"
        elif p["kind"] == "u32":
            v = f"0x{p['value']:x} (u32)"
        else:
            v = f"[{p['hex']}] ({p['length']} bytes)"
        lines.append(f"{indent}{p['name']} = {v}")
    blob = node.get("blob")
    if blob is not None:
        got = "not readable" if blob["read"] is None else f"{blob['read']} bytes read"
        lines.append(f"{indent}-> blob: {blob['kind']}, blob-size {blob['size']}, {got}")
        md = blob["metadata"]
        if md is not None:
            lines.append(f"{indent}   version {md['version']}, previous release "
                         f"{md['previous_release']!r}, kexec count {md['kexec_count']}")
    if node.get("sub_fdt"):
        sub = node["sub_fdt"]
        lines.append(f"{indent}-> sub-FDT {sub['compatible'] or '?'}, {sub['size']} bytes:")
        if sub["root"] is not None:
            _render_node(sub["root"], indent + "   ", lines, top=True)
        else:
            lines.append(f"{indent}   (unreadable: {'; '.join(sub['problems'])})")
    for c in node["children"]:
        _render_node(c, indent, lines)
    if not top:
        lines.append(f"{indent[:-2]}}}")
