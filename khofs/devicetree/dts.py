"""DTS text in through the `fdt` package: the blob is built with libfdt's sequential-write
API, as a kernel producer builds its sub-FDT. No dtc at run time."""

import re
import struct

import fdt
import libfdt


class DtsError(ValueError):
    """Text that is not DTS khofs takes; `line` is 1-based (0 when not tied to a line)."""

    def __init__(self, line: int, message: str):
        self.line = line
        super().__init__(f"line {line}: {message}" if line else message)


DTC_HINT = "; compile it with `dtc -O dtb` and add the .dtb"
NAME = r"[A-Za-z0-9,._+*#?@-]+"
_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r\n\f\v]+)
  | (?P<comment>//[^\n]*|/\*.*?\*/)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<bytes>\[[^\]]*\])
  | (?P<directive>/[a-z][a-z0-9-]*/)
  | (?P<word>""" + NAME + r""")
  | (?P<punct>[{}<>;=/:&(),'])
""", re.S | re.X)
_ESCAPES = {"a": 7, "b": 8, "t": 9, "n": 10, "v": 11, "f": 12, "r": 13, "\\": 92, '"': 34, "'": 39}
_INT = re.compile(r"(0[xX][0-9a-fA-F]+|[0-9]+)(?:U|L|UL|LL|ULL)?")


def _tokens(text: str):
    pos, line = 0, 1
    while pos < len(text):
        if text.startswith("/*", pos) and text.find("*/", pos + 2) < 0:
            raise DtsError(line, "unterminated /* comment")
        m = _TOKEN.match(text, pos)
        if m is None:
            if text[pos] == '"':
                raise DtsError(line, "unterminated string")
            if text[pos] == "[":
                raise DtsError(line, "unterminated byte string [ ]")
            raise DtsError(line, f"unexpected character {text[pos]!r}")
        kind, val = m.lastgroup, m.group()
        if kind == "punct" and val in ":&":
            what = "labels" if val == ":" else "phandle references (&label)"
            raise DtsError(line, f"{what} are not supported{DTC_HINT}")
        if kind == "punct" and val in "()'":
            raise DtsError(line, f"expressions and character literals are not supported{DTC_HINT}")
        if kind == "word" and val.startswith("#include"):
            raise DtsError(line, f"#include needs the C preprocessor{DTC_HINT}")
        if kind not in ("ws", "comment"):
            yield kind, val, line
        line += val.count("\n")
        pos = m.end()
    yield "eof", "", line


def _string_bytes(body: str, line: int) -> bytes:
    out, i, raw = bytearray(), 0, body.encode()
    while i < len(raw):
        c = raw[i]
        if c != 0x5C:
            out.append(c)
            i += 1
            continue
        nxt = chr(raw[i + 1])
        if nxt in _ESCAPES:
            out.append(_ESCAPES[nxt])
            i += 2
        elif nxt == "x" and re.match(rb"[0-9a-fA-F]", raw[i + 2:i + 3]):
            m = re.match(rb"[0-9a-fA-F]{1,2}", raw[i + 2:])
            out.append(int(m.group(), 16))
            i += 2 + len(m.group())
        elif nxt in "01234567":
            m = re.match(rb"[0-7]{1,3}", raw[i + 1:])
            out.append(int(m.group(), 8) & 0xFF)
            i += 1 + len(m.group())
        else:                   # as dtc: an unknown escape is the character itself
            out += raw[i + 1:i + 2]
            i += 2
    return bytes(out)


def _safe_string(b: bytes) -> bool:
    """A string fdt 0.3.3 reads back unchanged from `name = "..."`."""
    s = b.decode("latin-1")
    return (bool(s) and all(0x20 <= c < 0x7F for c in b) and not set(s) & set('"\\;')
            and "//" not in s and "/*" not in s and s == s.strip())


class _Parser:
    def __init__(self, text: str):
        self.toks = _tokens(text)
        self.next()

    def next(self):
        self.kind, self.val, self.line = next(self.toks)

    def expect(self, val, what=None):
        if self.val != val or self.kind in ("string", "bytes"):
            got = "end of file" if self.kind == "eof" else repr(self.val)
            raise DtsError(self.line, f"expected {what or repr(val)}, found {got}")
        self.next()

    def file(self) -> list[str]:
        if self.kind == "eof":
            raise DtsError(self.line, "empty: no /dts-v1/; and no root node")
        if self.val != "/dts-v1/":
            raise DtsError(self.line, "a DTS file starts with /dts-v1/;")
        self.next()
        self.expect(";")
        out = ["/dts-v1/;"]
        while self.val == "/memreserve/":
            self.next()
            addr, size = self.number(64), self.number(64)
            self.expect(";")
            out.append(f"/memreserve/ {addr:#x} {size:#x};")
        if self.val != "/" or self.kind != "punct":
            self.bad("the root node '/ {'")
        self.next()
        self.body("/", out)
        if self.kind != "eof":
            if self.val == "/":
                raise DtsError(self.line, f"a second root node definition is not supported "
                                          f"(merge it into the first){DTC_HINT}")
            self.bad("end of file")
        return out

    def bad(self, what):
        if self.kind == "directive":
            raise DtsError(self.line, f"unknown or unsupported directive {self.val}{DTC_HINT}")
        got = "end of file" if self.kind == "eof" else repr(self.val)
        raise DtsError(self.line, f"expected {what}, found {got}")

    def body(self, name, out):
        start = self.line
        out.append(f"{name} {{")
        self.expect("{")
        props, nodes = set(), set()
        while self.val != "}" or self.kind != "punct":
            if self.kind == "eof":
                raise DtsError(start, f"node {name!r} is not closed (no '}};')")
            if self.kind != "word":
                self.bad("a property or node name")
            word, line = self.val, self.line
            self.next()
            if self.val == "{" and self.kind == "punct":
                if not re.fullmatch(r"[A-Za-z0-9,._+-]+(@[A-Za-z0-9,._+-]*)?", word):
                    raise DtsError(line, f"{word!r} is not a valid node name")
                if word in nodes:
                    raise DtsError(line, f"duplicate node {word!r}")
                nodes.add(word)
                self.body(word, out)
                continue
            if nodes:
                raise DtsError(line, f"property {word!r} after a subnode: properties must "
                                     "precede subnodes")
            if not re.fullmatch(r"[A-Za-z0-9,._+?#-]+", word):
                raise DtsError(line, f"{word!r} is not a valid property name")
            if word in props:
                raise DtsError(line, f"duplicate property {word!r}")
            props.add(word)
            out.append(self.prop(word, line))
        end = self.line
        self.next()
        if self.val != ";" or self.kind != "punct":
            raise DtsError(end, "expected ';' after '}'")
        self.next()
        out.append("};")

    def number(self, bits):
        m = _INT.fullmatch(self.val) if self.kind == "word" else None
        if m is None:
            self.bad("a number")
        v = int(m.group(1), 16) if m.group(1)[:2].lower() == "0x" else \
            int(m.group(1), 8 if m.group(1).startswith("0") else 10)
        if v >> bits:
            raise DtsError(self.line, f"{self.val} does not fit in {bits} bits")
        self.next()
        return v

    def prop(self, name, line) -> str:
        if self.val == ";":
            self.next()
            return f"{name};"
        self.expect("=", "'=' or ';'")
        chunks = []             # (form, bytes): form "s" (string), 32, 64 or "b"
        while True:
            if self.kind == "string":
                b = _string_bytes(self.val[1:-1], self.line)
                chunks.append(("s" if _safe_string(b) else "b", b + b"\0"))
                self.next()
            elif self.kind == "bytes":
                digits = re.sub(r"\s+|/\*.*?\*/|//[^\n]*", "", self.val[1:-1], flags=re.S)
                if not re.fullmatch(r"(?:[0-9a-fA-F]{2})*", digits):
                    raise DtsError(self.line, "a byte string holds pairs of hex digits")
                chunks.append(("b", bytes.fromhex(digits)))
                self.next()
            else:
                bits = 32
                if self.val == "/bits/":
                    self.next()
                    bits = self.number(8)
                    if bits not in (8, 16, 32, 64):
                        raise DtsError(self.line, "/bits/ takes 8, 16, 32 or 64")
                if self.val != "<":
                    self.bad("a value (\"string\", <cells> or [bytes])")
                self.next()
                cells = []
                while self.val != ">":
                    cells.append(self.number(bits))
                fmt = {8: "B", 16: "H", 32: "I", 64: "Q"}[bits]
                chunks.append((bits if bits >= 32 else "b",
                               struct.pack(f">{len(cells)}{fmt}", *cells)))
                self.next()
            if self.val != ",":
                break
            self.next()
        self.expect(";", "';' or ',' after a value")
        return normalize_value(name, chunks)


def normalize_value(name: str, chunks) -> str:
    """One property line in a form fdt 0.3.3 parses into exactly the bytes dtc gives:
    strings as a string list, 32- and 64-bit cells as 32-bit cells (a /bits/ 64 value is
    its two big-endian halves, the same bytes), anything else as a byte string."""
    forms = {f for f, _ in chunks}
    data = b"".join(b for _, b in chunks)
    if not data:
        return f"{name};"
    if forms == {"s"}:
        return f"{name} = " + ", ".join(f'"{b[:-1].decode()}"' for _, b in chunks) + ";"
    if forms <= {32, 64}:
        cells = struct.unpack(f">{len(data) // 4}I", data)
        return f"{name} = <" + " ".join(f"{c:#x}" for c in cells) + ">;"
    return f"{name} = [" + " ".join(f"{c:02x}" for c in data) + "];"


def _decode(data: bytes) -> str:
    nul = data.find(b"\0")
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        bad = e.start
    else:
        bad = nul
    if bad >= 0:
        raise DtsError(data.count(b"\n", 0, bad) + 1,
                       f"not DTS text (binary byte 0x{data[bad]:02x}); a .dtb starts with d00dfeed")
    return text


def dts_to_dtb(data) -> bytes:
    """Compile DTS text (str or bytes) to an FDT blob; DtsError names the line at fault."""
    text = _decode(data) if isinstance(data, (bytes, bytearray)) else data
    lines = _Parser(text).file()
    tree = fdt.parse_dts("\n".join(lines) + "\n")
    sw = libfdt.FdtSw()
    for e in tree.entries:
        sw.add_reservemap_entry(e["address"], e["size"])
    sw.finish_reservemap()
    _emit(sw, tree.root, "")
    f = sw.as_fdt()
    return bytes(f.as_bytearray()[:f.totalsize()])


def _emit(sw, node, name):
    sw.begin_node(name)
    for p in node.props:
        sw.property(p.name, prop_bytes(p))
    for child in node.nodes:
        _emit(sw, child, child.name)
    sw.end_node()


def prop_bytes(p) -> bytes:
    """A parsed property's payload, as dtc lays it out."""
    if isinstance(p, fdt.PropStrings):
        return b"".join(s.encode() + b"\0" for s in p.data)
    if isinstance(p, fdt.PropWords):
        return struct.pack(f">{len(p.data)}I", *p.data)
    if isinstance(p, fdt.PropBytes):
        return bytes(p.data)
    return b""
