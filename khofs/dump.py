"""Decode and check KHO FDTs: `khofs dump`.

The JSON form (`--json`) is one object per decoded FDT:
  {"path": str, "size": int, "compatible": str|null,
   "header": {"version", "last_comp_version", "totalsize", "off_mem_rsvmap", ...},
   "root": NODE, "memory_map": MAP|null, "problems": [str]}
  NODE = {"name": str, "properties": [{"name": str, "length": int, "hex": str,
          "value": str|int|null, "kind": "string"|"u64"|"u32"|"bytes"}],
          "children": [NODE], "sub_fdt": DECODED|null}
  MAP = {"chunks": int, "ranges": [{"order": int, "start": int, "size": int}],
         "total_bytes": int, "error": str|null}
`value` is the decoded value: strings as text, 8-byte properties as native-endian (LE) u64
addresses, 4-byte ones as LE u32. `sub_fdt` is the FDT a node's `fdt` property points to,
decoded the same way, when it can be read.
"""

import struct

from .kernel.fdt import FDT_HEADER, check_header, tree
from .kernel.memtrack import MapError, walk_memory_map

HEADER_FIELDS = ("magic", "totalsize", "off_dt_struct", "off_dt_strings", "off_mem_rsvmap",
                 "version", "last_comp_version", "boot_cpuid_phys", "size_dt_strings",
                 "size_dt_struct")

# What the KHO bindings (Documentation/core-api/kho/bindings) and the producers define.
BINDINGS = {
    "kho-v1": {"props": {"compatible": "string", "preserved-memory-map": "u64"},
               "required": ["compatible", "preserved-memory-map"],
               "child": {"props": {"fdt": "u64"}, "required": ["fdt"], "children": False}},
    "memblock-v1": {"props": {"compatible": "string"}, "required": ["compatible"],
                    "child": {"props": {"compatible": "string", "start": "u64", "size": "u64"},
                              "required": ["compatible", "start", "size"], "children": False,
                              "compatible": "reserve-mem-v1"}},
    "kho-test-v1": {"props": {"compatible": "string", "magic": "u32"},
                    "required": ["compatible", "magic"], "child": None},
}
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
        return self.client.mem_read(phys, size)


def decode(blob: bytes, path: str, mem: MemorySource | None = None, sub_blobs=None,
           depth: int = 0) -> dict:
    """Decode one FDT; sub_blobs maps subtree names to their bytes when known."""
    out = {"path": path, "size": len(blob), "compatible": None, "header": None, "root": None,
           "memory_map": None, "problems": []}
    err = check_header(blob)
    if err:
        out["problems"].append(f"not a valid FDT (libfdt error {err})")
        return out
    hdr = dict(zip(HEADER_FIELDS, FDT_HEADER.unpack_from(blob)))
    out["header"] = hdr
    if hdr["totalsize"] != len(blob):
        out["problems"].append(f"totalsize {hdr['totalsize']} != {len(blob)} bytes read")
    t = tree(blob[:hdr["totalsize"]])
    root = _node(t, mem, sub_blobs or {}, depth, path)
    out["root"] = root
    compat = next((p["value"] for p in root["properties"] if p["name"] == "compatible"), None)
    out["compatible"] = compat
    _check(root, out["problems"])
    if compat == "kho-v1" and mem is not None:
        pmm = next((p for p in root["properties"] if p["name"] == "preserved-memory-map"), None)
        if pmm is not None and pmm["kind"] == "u64":
            out["memory_map"] = _memory_map(mem, pmm["value"])
    for child in root["children"]:
        if child.get("sub_fdt"):
            out["problems"] += [f"{child['name']}: {p}" for p in child["sub_fdt"]["problems"]]
    return out


def _node(t: dict, mem, sub_blobs, depth, path) -> dict:
    node = {"name": t["name"], "properties": [_prop(n, d) for n, d in t["props"]],
            "children": [_node(c, mem, sub_blobs, depth, path) for c in t["children"]],
            "sub_fdt": None}
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


def _check(root: dict, problems: list) -> None:
    compat = next((p for p in root["properties"] if p["name"] == "compatible"), None)
    if compat is None:
        problems.append("root: missing compatible")
        return
    rule = BINDINGS.get(compat["value"])
    if rule is None:
        if compat["value"] is not None and compat["value"].startswith("kho-v"):
            problems.append(f"root: compatible {compat['value']!r} is not kho-v1 (the next "
                            "kernel rejects it)")
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


def _memory_map(mem: MemorySource, first: int) -> dict:
    out = {"chunks": 0, "ranges": [], "total_bytes": 0, "error": None}
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
    lines = []
    compat = d["compatible"] or "?"
    lines.append(f"{indent}{d['path']}: FDT {compat}, {d['size']} bytes")
    if d["root"] is not None:
        _render_node(d["root"], indent + "  ", lines, top=True)
    m = d["memory_map"]
    if m is not None:
        lines.append(f"{indent}  memory map: {m['chunks']} chunk(s), "
                     f"{_fmt_size(m['total_bytes'])} preserved")
        for r in m["ranges"]:
            n = r["size"] >> (12 + r["order"])
            lines.append(f"{indent}    order {r['order']:2}: [0x{r['start']:x}, "
                         f"0x{r['start'] + r['size']:x}) {n} block(s), {_fmt_size(r['size'])}")
        if m["error"]:
            lines.append(f"{indent}    error: {m['error']}")
    if indent == "":
        probs = d["problems"]
        lines.append("problems: none" if not probs else "problems:")
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
