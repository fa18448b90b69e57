"""Helpers shared by the khofs reliability suites: commands, oracles, isolation, reporting.

The oracles here are written from KHO-SPEC.md and the kernel sources it cites, not from
khofs's own code, so that a test compares khofs against an independent reading of the rules.
"""

import errno
import faulthandler
import json
import os
import selectors
import signal
import struct
import sys
import time
import traceback

from hypothesis import HealthCheck, Phase, given, seed as hyp_seed, settings

from khofs.runtime import pid_alive  # noqa: F401  (a process helper, not an oracle)
from khofs_testlib import KHOFS, is_mounted, mount_count, run_khofs, wait_for  # noqa: F401

PY = sys.executable
PAGE = 4096
U64 = 1 << 64
HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")


# -- running things ---------------------------------------------------------------------
def khofs(*args, timeout=60, input=None, check=False, env=None):
    """khofs ARGS with bytes output."""
    return run_khofs(*args, timeout=timeout, input=input, check=check, env=env)


def read_file(path) -> bytes:
    with open(path, "rb", buffering=0) as f:
        out = bytearray()
        while True:
            b = f.read(65536)
            if not b:
                return bytes(out)
            out += b


def write_file(path, data: bytes) -> None:
    """One write(2) of data on a fresh open (as `echo > path` does), all of it taken."""
    with open(path, "wb", buffering=0) as f:
        assert f.write(data) == len(data)


# -- reporting -----------------------------------------------------------------------------
FAMILY_RESULTS: dict = {}


def report_family(name: str, tried: int, failures: list) -> None:
    FAMILY_RESULTS[name] = (tried, len(failures))
    print(f"\n{name}: {tried} tried, {len(failures)} failed", flush=True)


def check_family(name: str, tried: int, failures: list, minimum: int = 500) -> None:
    report_family(name, tried, failures)
    if os.environ.get("KHOFS_REL_DUMP"):
        with open(os.environ["KHOFS_REL_DUMP"], "a") as f:
            f.write(f"== {name}\n" + "".join(f"{x}\n" for x in failures))
    assert tried >= minimum, f"{name}: only {tried} distinct inputs (need {minimum})"
    if failures:
        shown = "\n".join(f"  - {f}" for f in failures[:25])
        more = f"\n  ... and {len(failures) - 25} more" if len(failures) > 25 else ""
        raise AssertionError(f"{name}: {len(failures)} of {tried} failed:\n{shown}{more}")


# -- hypothesis: draw a seeded, deduplicated set of examples ---------------------------------
def collect_examples(strategy, n: int, seed: int, key=repr) -> list:
    found: dict = {}

    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @hyp_seed(seed)
    @given(strategy)
    def collect(x):
        found.setdefault(key(x), x)

    collect()
    return list(found.values())


def _literal(node):
    import ast
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        a, b = _literal(node.left), _literal(node.right)
        return a + b if isinstance(node.op, ast.Add) else a * b
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(_literal(e) for e in node.elts)
    raise ValueError(f"not a corpus literal: {ast.dump(node)}")


def load_corpus(name: str) -> list:
    """One Python literal per line (constants, tuples, `+` and `*`); '#' starts a comment."""
    import ast
    out = []
    with open(os.path.join(CORPUS, name)) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(_literal(ast.parse(line, mode="eval").body))
    return out


# -- isolation: run each case in a forked child ---------------------------------------------
def run_isolated(items, fn, timeout=2.5, parallel=2):
    """fn(item) in a forked child per item (state never leaks between cases; a crash or a hang
    of the code under test is a result, not the end of the session).

    Returns one dict per item: status ok|exception|crash|timeout, result or error, seconds.
    """
    results = [None] * len(items)
    running = {}
    sel = selectors.DefaultSelector()
    nxt = 0
    sys.stdout.flush()
    sys.stderr.flush()
    while nxt < len(items) or running:
        while nxt < len(items) and len(running) < parallel:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    os.close(r)
                    faulthandler.disable()
                    try:
                        res = {"status": "ok", "result": fn(items[nxt])}
                    except BaseException as e:
                        res = {"status": "exception", "error": f"{type(e).__name__}: {e}"[:500],
                               "tb": traceback.format_exc()[-2500:]}
                    data = memoryview(json.dumps(res, default=repr).encode())
                    while data:
                        data = data[os.write(w, data):]
                finally:
                    os._exit(0)
            os.close(w)
            os.set_blocking(r, False)
            running[pid] = {"i": nxt, "fd": r, "buf": bytearray(), "t0": time.monotonic(),
                            "eof": False}
            sel.register(r, selectors.EVENT_READ, pid)
            nxt += 1
        for key, _ in sel.select(timeout=0.02):
            st = running[key.data]
            try:
                chunk = os.read(key.fd, 1 << 16)
            except BlockingIOError:
                continue
            if chunk:
                st["buf"] += chunk
            else:
                st["eof"] = True
                sel.unregister(key.fd)
        now = time.monotonic()
        for pid, st in list(running.items()):
            if st["eof"]:
                _, status = os.waitpid(pid, 0)
                secs = now - st["t0"]
                if os.WIFSIGNALED(status):
                    res = {"status": "crash", "error": f"killed by signal {os.WTERMSIG(status)} "
                           f"({signal.Signals(os.WTERMSIG(status)).name})"}
                else:
                    try:
                        res = json.loads(st["buf"])
                    except ValueError:
                        res = {"status": "crash", "error": f"no result (exit status {status})"}
            elif now - st["t0"] > timeout:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                sel.unregister(st["fd"])
                secs = now - st["t0"]
                res = {"status": "timeout", "error": f"still running after {timeout}s"}
            else:
                continue
            os.close(st["fd"])
            res["seconds"] = round(secs, 3)
            results[st["i"]] = res
            del running[pid]
    sel.close()
    return results


# -- the ABI profiles (KHO-SPEC §0, §9; docs/abi-profiles.md) ---------------------------------
FINALIZE_PROFILES = ["6.16", "6.18", "7.0"]          # 7.1+ have no out/finalize
RADIX_PROFILES = ("7.1", "7.2", "7.4")               # radix map, blob-size, kexec-metadata
COMPATIBLE = {"6.16": "kho-v1", "6.18": "kho-v1", "7.0": "kho-v1", "7.1": "kho-v3",
              "7.2": "kho-v4", "7.4": "kho-v4"}
FOUND_LINE = {"6.16": "KHO: found kexec handover data. Will skip init for some devices",
              "6.18": "KHO: found kexec handover data. Will skip init for some devices",
              "7.0": "KHO: found kexec handover data.", "7.1": "KHO: found kexec handover data.",
              "7.2": "KHO: found kexec handover data.", "7.4": "KHO: found kexec handover data."}


def revival_off_line(abi: str, err: int | None = None) -> str:
    """kho_populate's failure line: 7.1 dropped the number (a prefix when err is None)."""
    if abi in RADIX_PROFILES:
        return "KHO: disabling KHO revival"
    return "KHO: disabling KHO revival: " + ("" if err is None else str(err))


def live_root_fdt(client) -> bytes:
    """The root FDT as its page holds it now: whole, where 7.x's out/fdt shows a prefix (cut
    at its totalsize, but never inside the header)."""
    page = client.mem_read(client.call("memory_layout")["fdt_phys"], PAGE)
    return page[:max(40, min(PAGE, int.from_bytes(page[4:8], "big")))]


def _node_props(f, node) -> dict:
    """{name: (offset of the value in the blob, value)} of one node's properties (libfdt)."""
    import libfdt
    props = {}
    off = f.first_property_offset(node, (libfdt.NOTFOUND,))
    while off >= 0:
        p = f.get_property_by_offset(off)
        props[p.name] = (f.off_dt_struct() + off + 12, bytes(p))
        off = f.next_property_offset(off, (libfdt.NOTFOUND,))
    return props


def root_props(fdt: bytes) -> dict:
    """{name: (offset of the value in fdt, value)} of the root node's properties."""
    import libfdt
    return _node_props(libfdt.Fdt(bytearray(fdt)), 0)


def root_prop(fdt: bytes, name: str):
    """The root node's property name (bytes), or None (also for an FDT libfdt refuses)."""
    import libfdt
    try:
        return root_props(fdt).get(name, (None, None))[1]
    except libfdt.FdtException:
        return None


def child_props(fdt: bytes) -> dict:
    """{name: {property: (offset of the value in fdt, value)}} of the root's children, in FDT
    order."""
    import libfdt
    f = libfdt.Fdt(bytearray(fdt))
    out = {}
    node = f.first_subnode(0, (libfdt.NOTFOUND,))
    while node >= 0:
        out[f.get_name(node)] = _node_props(f, node)
        node = f.next_subnode(node, (libfdt.NOTFOUND,))
    return out


def subnodes(fdt: bytes) -> dict:
    """{name: {property: value}} of the root node's children."""
    return {n: {k: v for k, (_, v) in props.items()} for n, props in child_props(fdt).items()}


def chunk_map_marks(read, first: int, phys: int, order: int = 0, bits: int = 4096 * 8) -> bool:
    """Whether the serialized chunk list at `first` (KHO-SPEC §5) marks the order-`order` block
    at phys; read(phys, size) reads memory."""
    seen = set()
    while first and first not in seen:
        seen.add(first)
        page = read(first, PAGE)
        nxt, corder, num = struct.unpack_from("<QII", page)
        if corder == order:
            for i in range(min(num, 255)):
                start, bitmap = struct.unpack_from("<QQ", page, 16 + 16 * i)
                b = (phys - start) >> (order + 12)
                if start <= phys and b < bits:
                    return bool(read(bitmap + b // 8, 1)[0] >> (b % 8) & 1)
        first = nxt
    return False


# -- oracles: lib/kstrtox.c and lib/cmdline.c ------------------------------------------------
HEX = b"0123456789abcdefABCDEF"
DIGITS = {8: b"01234567", 10: b"0123456789", 16: HEX}
KERNEL_SPACE = b" \t\n\v\f\r"          # isspace() for the ASCII range


def kstrtoull_oracle(s: bytes, base: int = 0):
    """("ok", value) or ("err", errno), as kstrtoull(s, base) on the C string s."""
    s = s.split(b"\0", 1)[0]
    if s[:1] == b"+":
        s = s[1:]
    if base == 0:
        if s[:1] == b"0":
            base = 16 if (s[1:2] in (b"x", b"X") and len(s) > 2 and s[2] in HEX) else 8
        else:
            base = 10
    if base == 16 and s[:1] == b"0" and s[1:2] in (b"x", b"X"):
        s = s[2:]
    n = 0
    while n < len(s) and s[n] in DIGITS[base]:
        n += 1
    if n == 0:
        return ("err", errno.EINVAL)
    val = int(s[:n], base)
    if val >= U64:
        return ("err", errno.ERANGE)
    if s[n:] not in (b"", b"\n"):
        return ("err", errno.EINVAL)
    return ("ok", val)


def finalize_write_oracle(data: bytes, finalized: bool, abi: str = "6.18"):
    """(expected write(2) result: len or -errno, finalized afterwards) for out/finalize:
    simple_attr_write looks at min(len, 23) bytes, kstrtoull base 0, then the KHO state rule
    of the profile (KHO-SPEC §2; §9 and kho-abi-notes §6.4 for 7.0)."""
    kind, v = kstrtoull_oracle(data[:23], 0)
    if kind == "err":
        return -v, finalized
    if abi == "7.0":
        # kho_out_finalize_set: nonzero re-serializes every time, 0 is EINVAL in any state.
        return (len(data), True) if v else (-errno.EINVAL, finalized)
    if v:
        return (-errno.EEXIST, True) if finalized else (len(data), True)
    return (len(data), False) if finalized else (-errno.ENOENT, False)


def kstrtobool_oracle(s):
    """True/False, or None for -EINVAL. lib/kstrtox.c of the 6.x kernels: first character
    one of 'EeTtYy1' or 'DdFfNn0', or [oO][NnFf] for "on"/"off"."""
    if s is None:
        return None
    s = s.encode() if isinstance(s, str) else s
    c0 = s[:1]
    if c0 and c0 in b"EeTtYy1":
        return True
    if c0 and c0 in b"DdFfNn0":
        return False
    if c0 and c0 in b"oO":
        c1 = s[1:2]
        if c1 and c1 in b"nN":
            return True
        if c1 and c1 in b"fF":
            return False
    return None


def simple_strtoull_oracle(s: bytes):
    """(value mod 2**64, characters consumed)."""
    if s[:1] == b"0" and s[1:2] in (b"x", b"X") and len(s) > 2 and s[2] in HEX:
        base, start = 16, 2
    elif s[:1] == b"0":
        base, start = 8, 0
    else:
        base, start = 10, 0
    n = start
    while n < len(s) and s[n] in DIGITS[base]:
        n += 1
    if n == start:
        return 0, 0
    return int(s[start:n], base) % U64, n


def memparse_oracle(s: bytes):
    v, n = simple_strtoull_oracle(s)
    shift = {b"k": 10, b"m": 20, b"g": 30, b"t": 40, b"p": 50, b"e": 60}.get(s[n:n + 1].lower())
    if shift is not None:
        v = (v << shift) % U64
        n += 1
    return v, n


def kho_scratch_oracle(val):
    """kho_parse_scratch_size of 6.18: ("scale", N), ("sizes", [L, G, P]) or None (-EINVAL)."""
    if val is None:
        return None
    p = val.encode() if isinstance(val, str) else val
    if not p:
        return None
    if p.endswith(b"%"):
        if len(p) > 11:
            return None
        kind, v = kstrtoull_oracle(p[:-1], 10)
        if kind == "err" or v > 0xFFFFFFFF:
            return None
        return ("scale", v)
    pos, sizes = 0, []
    for i in range(3):
        if i:
            if p[pos:pos + 1] != b",":
                return None
            pos += 1
        v, n = memparse_oracle(p[pos:])
        if n == 0:
            return None
        sizes.append(v)
        pos += n
    if sum(sizes) % U64 == 0 or pos != len(p):
        return None
    return ("sizes", sizes)


def reserve_mem_oracle(val, taken_names, count):
    """reserve_mem= parsing: (size, align, name) or an errno."""
    if val is None:
        return errno.EINVAL
    if count >= 8:
        return errno.EBUSY
    p = val.encode() if isinstance(val, str) else val
    size, n = memparse_oracle(p)
    if not size or n == 0:
        return errno.EINVAL
    if p[n:n + 1] != b":":
        return errno.EINVAL
    align, m = memparse_oracle(p[n + 1:])
    pos = n + 1 + m
    if p[pos:pos + 1] != b":":
        return errno.EINVAL
    align = max(align, 64)
    name = p[pos + 1:]
    if not name or len(name) >= 16:
        return errno.EINVAL
    if all(c in KERNEL_SPACE for c in name):
        return errno.EINVAL
    if name in taken_names:
        return errno.EBUSY
    return (size, align, name)


def kernel_params(cmdline: str):
    """next_arg() for command lines without quotes: [(param, value or None)], up to `--`."""
    words = []
    cur = bytearray()
    for c in cmdline.encode():
        if c in KERNEL_SPACE:
            if cur:
                words.append(bytes(cur))
                cur = bytearray()
        else:
            cur.append(c)
    if cur:
        words.append(bytes(cur))
    out = []
    for w in words:
        if w == b"--":
            break
        if b"=" in w:
            k, v = w.split(b"=", 1)
            out.append((k.decode(), v.decode()))
        else:
            out.append((w.decode(), None))
    return out


def parameq(a: str, b: str) -> bool:
    return a.replace("-", "_") == b.replace("-", "_")


def kround_up(x: int, a: int) -> int:
    return ((((x - 1) % U64) | (a - 1)) + 1) % U64


# -- oracles: libfdt -------------------------------------------------------------------------
FDT_MAGIC = 0xD00DFEED
FDT_ERR_TRUNCATED, FDT_ERR_BADMAGIC, FDT_ERR_BADVERSION = 8, 9, 10


def fdt_check_header_oracle(b: bytes) -> int:
    """fdt_check_header() of libfdt (0 or -FDT_ERR_*), on the 40 header bytes alone."""
    if len(b) < 40:
        return -FDT_ERR_TRUNCATED
    magic, total, off_struct, off_strings, off_rsv, ver, last_comp, _cpu, size_strings, size_struct = \
        struct.unpack_from(">10I", b)
    if magic != FDT_MAGIC:
        return -FDT_ERR_BADMAGIC
    if ver < 2 or last_comp > 17 or ver < last_comp:
        return -FDT_ERR_BADVERSION
    hdr = 28 if ver <= 1 else 32 if ver <= 2 else 36 if ver <= 16 else 40
    if total < hdr or total > 0x7FFFFFFF:
        return -FDT_ERR_TRUNCATED

    def off_ok(off):
        return hdr <= off <= total

    def block_ok(base, size):
        end = (base + size) & 0xFFFFFFFF
        return off_ok(base) and end >= base and off_ok(end)

    if not off_ok(off_rsv):
        return -FDT_ERR_TRUNCATED
    if not (off_ok(off_struct) if ver < 17 else block_ok(off_struct, size_struct)):
        return -FDT_ERR_TRUNCATED
    if not block_ok(off_strings, size_strings):
        return -FDT_ERR_TRUNCATED
    return 0


def stringlist_contains(value: bytes, s: bytes) -> bool:
    """fdt_stringlist_contains: is s one of the NUL-terminated strings of value?"""
    while value:
        n = value.find(b"\0")
        if n < 0:
            return False
        if value[:n] == s:
            return True
        value = value[n + 1:]
    return False


def fdt_problem(blob: bytes, compat: str | None = None):
    """Why blob is not a well-formed FDT whose totalsize is its length (None if it is)."""
    import libfdt
    if len(blob) < 40:
        return f"{len(blob)} bytes is shorter than an FDT header"
    err = fdt_check_header_oracle(blob)
    if err:
        return f"header check fails ({err})"
    total = struct.unpack_from(">I", blob, 4)[0]
    if total != len(blob):
        return f"totalsize {total} != length {len(blob)}"
    try:
        f = libfdt.Fdt(bytearray(blob))
        if compat is not None:
            got = bytes(f.getprop(0, "compatible"))
            if not stringlist_contains(got, compat.encode()):
                return f"compatible is {got!r}, not {compat!r}"
    except libfdt.FdtException as e:
        return f"libfdt: {e}"
    return None


def small_dtb(compat: str, u32: dict | None = None) -> bytes:
    """A one-node FDT blob with the given compatible (and u32 properties), trimmed to size."""
    import libfdt
    sw = libfdt.FdtSw()
    sw.finish_reservemap()
    sw.begin_node("")
    sw.property_string("compatible", compat)
    for name, val in (u32 or {}).items():
        sw.property_u32(name, val)
    sw.end_node()
    b = bytes(sw.as_fdt().as_bytearray())
    return b[:int.from_bytes(b[4:8], "big")]
