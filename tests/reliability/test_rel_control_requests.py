"""Bad input, family (c): requests on a mount's control socket.

Every request here is one the daemon must reject: the reply is ok=false with an errno and a
message naming the problem, the observable state (status, subtrees, kernel log) is unchanged,
and the daemon keeps answering.
"""

import base64
import errno
import json
import socket
import string
import threading
import time

import pytest
from hypothesis import strategies as st

import khofs_rel_support as sup
from khofs import runtime
from khofs.client import Client

pytestmark = pytest.mark.fuse

MEMORY = 1 << 30
MAX_LINE = 256 << 20          # the documented request limit (control.py)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


DTB = sup.small_dtb("rel-ctl-v1")

# The protocol as documented: command -> (required fields, optional fields), field -> kind.
SPEC = {
    "status": ({}, {}), "log": ({}, {}), "subtree_list": ({}, {}), "kexec_exec": ({}, {}),
    "memory_layout": ({}, {}),
    "mem_alloc": ({"size": "int"}, {}),
    "mem_free": ({"phys": "int"}, {}),
    "mem_write": ({"phys": "int", "data": "b64"}, {}),
    "mem_read": ({"phys": "int", "size": "int"}, {}),
    "preserve": ({"phys": "int", "size": "int"}, {}),
    "unpreserve": ({"phys": "int", "size": "int"}, {}),
    "preserve_folio": ({"phys": "int", "order": "int"}, {"count": "int"}),
    "unpreserve_folio": ({"phys": "int", "order": "int"}, {}),
    "subtree_add": ({"name": "str", "blob": "b64"}, {"preserve": "bool"}),
    "subtree_remove": ({"name": "str"}, {}),
    "fail": ({"op": "str", "errno": "errno"}, {}),
    "test_kho": ({}, {"seed": "int"}),
    "kexec_load": ({}, {"cmdline": "str", "release": "str"}),
    "kexec": ({}, {"cmdline": "str", "release": "str"}),
}
RANGES = {  # (command, field) -> (lo, hi) of valid integers
    ("mem_alloc", "size"): (1, MEMORY), ("mem_read", "size"): (0, 1 << 30),
    ("preserve_folio", "order"): (0, 51), ("unpreserve_folio", "order"): (0, 51),
    ("preserve_folio", "count"): (1, (1 << 64) - 1), ("preserve", "size"): (0, (1 << 64) - 1),
    ("unpreserve", "size"): (0, (1 << 64) - 1),
}


def filler(cmd, field, page):
    """A valid value, so that exactly one field of a request is wrong."""
    return {"phys": page, "size": 4096, "order": 0, "count": 1, "seed": 1, "data": "AAAA",
            "blob": b64(DTB), "name": "relnew", "op": "finalize", "errno": "EPERM",
            "preserve": True, "cmdline": "kho=on", "release": "rel-1"}[field]


JSON_ANY = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                        | st.text(max_size=8),
                        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                        max_leaves=6)
WRONG = {
    "int": st.one_of(st.text(max_size=6), st.sampled_from(["1", "0x1000", "4096", ""]),
                     st.floats(allow_nan=False), st.sampled_from([1.0, 4096.0, 1e300, -0.0]),
                     st.booleans(), st.none(), st.lists(st.integers(), max_size=2),
                     st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
    "str": st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(),
                     st.lists(st.text(max_size=3), max_size=2),
                     st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
    "bool": st.one_of(st.integers(0, 1), st.sampled_from(["true", "false", "yes", ""]),
                      st.lists(st.booleans(), max_size=1), st.floats(allow_nan=False)),
    "errno": st.one_of(st.floats(allow_nan=False), st.booleans(), st.lists(st.integers(), max_size=2),
                       st.sampled_from([0, -1, 4096, 1 << 64, "ENOTANERRNO", "", "E", "errorcode",
                                        "EPERM ", " EPERM", "1"]),
                       st.integers(max_value=0), st.integers(min_value=4096),
                       st.text(alphabet=string.ascii_letters, min_size=1, max_size=8)
                       .filter(lambda s: not isinstance(getattr(errno, s.upper(), None), int))),
}
WRONG["b64"] = WRONG["str"]


def expect(errnos, *tokens):
    return {"errnos": tuple(errnos), "tokens": tokens}


@st.composite
def wrong_type(draw, page):
    cmd = draw(st.sampled_from([c for c, (r, o) in SPEC.items() if r or o]))
    req, opt = SPEC[cmd]
    fields = {**req, **opt}
    field = draw(st.sampled_from(sorted(fields)))
    value = draw(WRONG[fields[field]])
    body = {f: filler(cmd, f, page) for f in req}
    body[field] = value
    return {"cmd": cmd, **body}, expect([errno.EINVAL], f"'{field}'")


@st.composite
def out_of_range(draw, page):
    cmd = draw(st.sampled_from([c for c, (r, o) in SPEC.items()
                                if any(k == "int" for k in {**r, **o}.values())]))
    req, opt = SPEC[cmd]
    fields = [f for f, k in {**req, **opt}.items() if k == "int"]
    field = draw(st.sampled_from(fields))
    lo, hi = RANGES.get((cmd, field), (0, (1 << 64) - 1))
    value = draw(st.one_of(st.integers(max_value=lo - 1), st.integers(min_value=hi + 1),
                           st.sampled_from([lo - 1, hi + 1, -(1 << 63), 1 << 64, 10 ** 30])))
    body = {f: filler(cmd, f, page) for f in req}
    body[field] = value
    return {"cmd": cmd, **body}, expect([errno.ERANGE], f"'{field}'")


@st.composite
def missing_field(draw, page):
    cmd = draw(st.sampled_from([c for c, (r, o) in SPEC.items() if r]))
    req, _ = SPEC[cmd]
    drop = draw(st.sets(st.sampled_from(sorted(req)), min_size=1))
    body = {f: filler(cmd, f, page) for f in req if f not in drop}
    return {"cmd": cmd, **body}, expect([errno.EINVAL], *sorted(drop))


@st.composite
def unknown_field(draw, page):
    cmd = draw(st.sampled_from(sorted(SPEC)))
    req, opt = SPEC[cmd]
    key = draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in req and k not in opt
                                                      and k != "cmd"))
    body = {f: filler(cmd, f, page) for f in req}
    body[key] = draw(JSON_ANY)
    return {"cmd": cmd, **body}, expect([errno.EINVAL], key)


unknown_cmd = st.one_of(st.text(max_size=20), st.sampled_from(["Status", "status ", "STATUS",
                                                                "mem-alloc", "kexec_now", ""])) \
    .filter(lambda c: c not in SPEC) \
    .map(lambda c: ({"cmd": c}, expect([errno.EOPNOTSUPP], repr(c))))

bad_cmd_type = st.one_of(
    st.builds(lambda v: {"cmd": v}, st.one_of(st.integers(), st.none(), st.booleans(),
                                              st.lists(st.text(max_size=3), max_size=2),
                                              st.floats(allow_nan=False))),
    st.dictionaries(st.text(max_size=6).filter(lambda k: k != "cmd"), JSON_ANY, max_size=3)) \
    .map(lambda d: (d, expect([errno.EINVAL], "'cmd'")))

not_object = st.one_of(st.lists(JSON_ANY, max_size=3), st.text(max_size=10), st.integers(),
                       st.booleans(), st.none(), st.floats(allow_nan=False)) \
    .map(lambda v: (json.dumps(v).encode(), expect([errno.EINVAL], "JSON")))


def _not_json(b):
    try:
        json.loads(b)
    except (ValueError, UnicodeDecodeError):
        return True
    except RecursionError:
        return True
    return False


not_json = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda a, b: a + b, st.sampled_from([b'{"cmd": "status"', b'{"cmd": ', b"{", b"[1,",
                                                   b'{"cmd": "st\xff"}', b'\xef\xbb\xbf{"cmd": 1',
                                                   b"{'cmd': 'status'}", b'{"cmd": "status",}',
                                                   b"NaN", b"nul", b'"\\ud800', b'{"cmd":"status"}}']),
              st.binary(max_size=6)),
    st.builds(lambda n, c: c * n, st.integers(1000, 100000), st.sampled_from([b"[", b'{"a":'])),
).map(lambda b: b.replace(b"\n", b" ")).filter(_not_json) \
    .map(lambda b: (b, expect([errno.EINVAL], "JSON")))


def semantic(page):
    """Well-formed requests the kernel model must refuse (errno, words naming the problem)."""
    bad_names = st.one_of(st.sampled_from(["", "a/b", "x" * 32, "é", "a b", "fdt/", "\0"]),
                          st.text(min_size=1, max_size=8).filter(
                              lambda n: not (0 < len(n) <= 31 and all(
                                  c.isascii() and (c.isalnum() or c in ",._+-@") for c in n))))
    non_b64 = st.one_of(st.sampled_from(["!!!", "AAA", "A", "====", "é", "AAAA\u00e9", "\ud800",
                                         "Zm9v YmFy"]),
                        st.text(min_size=1, max_size=8).filter(_bad_b64))
    unaligned = st.integers(1, 4095)
    return st.one_of(
        st.builds(lambda o: ({"cmd": "preserve", "phys": page + o, "size": 4096},
                             expect([errno.EINVAL], "align")), unaligned),
        st.builds(lambda s: ({"cmd": "preserve", "phys": page, "size": s},
                             expect([errno.EINVAL], "align")), unaligned),
        st.builds(lambda o: ({"cmd": "unpreserve", "phys": page + o, "size": 4096},
                             expect([errno.EINVAL], "align")), unaligned),
        st.builds(lambda p: ({"cmd": "preserve", "phys": p, "size": 4096},
                             expect([errno.EFAULT], "memory")),
                  st.integers(MEMORY // 4096, (1 << 52) - 1).map(lambda n: n * 4096)),
        st.builds(lambda p, n: ({"cmd": "preserve_folio", "phys": p, "order": 0, "count": n},
                                expect([errno.EFAULT], "memory")),
                  st.just(page), st.integers(1 << 20, 1 << 40)),
        st.builds(lambda o: ({"cmd": "preserve_folio", "phys": (16 << 20) + 4096 * o, "order": 9},
                             expect([errno.EINVAL], "align")), st.integers(1, 511)),
        st.builds(lambda p: ({"cmd": "mem_write", "phys": p, "data": "AAAA"},
                             expect([errno.EFAULT], "memory")), st.integers(MEMORY - 2, 1 << 50)),
        st.builds(lambda p: ({"cmd": "mem_read", "phys": p, "size": 8},
                             expect([errno.EFAULT], "memory")), st.integers(MEMORY - 7, 1 << 50)),
        st.builds(lambda p: ({"cmd": "mem_free", "phys": p}, expect([errno.ENOENT], "allocation")),
                  st.integers(0, 1 << 40).filter(lambda p: p != page)),
        st.builds(lambda n: ({"cmd": "subtree_remove", "name": n}, expect([errno.ENOENT], "subtree")),
                  st.text(max_size=10).filter(lambda n: n != "relsub")),
        st.builds(lambda n: ({"cmd": "subtree_add", "name": n, "blob": b64(DTB)},
                             expect([errno.EINVAL], "name")), bad_names),
        st.sampled_from([({"cmd": "subtree_add", "name": n, "blob": b64(DTB)},
                          expect([errno.EEXIST], "registered")) for n in ("fdt", "relsub")]),
        st.builds(lambda b: ({"cmd": "subtree_add", "name": "relnew", "blob": b64(b)},
                             expect([errno.EINVAL], "FDT")),
                  st.one_of(st.binary(max_size=64), st.just(DTB + b"\0"), st.just(DTB[:-1]),
                            st.just(DTB[:40]))),
        st.builds(lambda s: ({"cmd": "subtree_add", "name": "relnew", "blob": s},
                             expect([errno.EINVAL], "base64")), non_b64),
        st.builds(lambda s: ({"cmd": "mem_write", "phys": page, "data": s},
                             expect([errno.EINVAL], "base64")), non_b64),
        st.builds(lambda r, c: ({"cmd": c, "release": r}, expect([errno.EINVAL], "release")),
                  st.one_of(st.just(""), st.text(min_size=65, max_size=80),
                            st.text(min_size=1, max_size=10).filter(lambda r: not r.isprintable())),
                  st.sampled_from(["kexec", "kexec_load"])),
        st.builds(lambda op: ({"cmd": "fail", "op": op, "errno": "EIO"},
                              expect([errno.EINVAL], "finalize")),
                  st.text(max_size=10).filter(lambda o: o not in ("finalize", "abort"))),
        st.builds(lambda e: ({"cmd": "fail", "op": "abort", "errno": e}, expect([errno.EINVAL], "errno")),
                  WRONG["errno"]),
        st.just(({"cmd": "kexec_exec"}, expect([errno.ENOENT], "image"))),
        st.just(({"cmd": "mem_alloc", "size": MEMORY}, expect([errno.ENOMEM], "memory"))),
    )


def _bad_b64(s):
    try:
        base64.b64decode(s, validate=True)
    except ValueError:
        return True
    return False


def encode(req):
    if isinstance(req, bytes):
        return req
    return json.dumps(req).encode()


class Conn:
    def __init__(self, mnt):
        self.path = runtime.paths(mnt)["sock"]
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(self.path)
        self.rfile = self.sock.makefile("rb")

    def ask(self, line: bytes):
        self.sock.sendall(line + b"\n")
        reply = self.rfile.readline()
        if not reply:
            raise ConnectionError("the daemon closed the connection")
        return json.loads(reply)

    def close(self):
        self.rfile.close()
        self.sock.close()


def snapshot(obs):
    return (obs.call("status"), obs.call("subtree_list"), obs.call("log"))


def judge(reply, exp):
    problems = []
    if not isinstance(reply, dict) or reply.get("ok") is not False:
        return [f"not rejected: {str(reply)[:300]}"]
    n = reply.get("errno")
    if not isinstance(n, int) or n not in errno.errorcode:
        problems.append(f"errno {n!r} is not an errno")
    elif reply.get("error") != errno.errorcode[n]:
        problems.append(f"error {reply.get('error')!r} does not name errno {n}")
    elif n not in exp["errnos"]:
        problems.append(f"{errno.errorcode[n]}, expected "
                        f"{'/'.join(errno.errorcode[e] for e in exp['errnos'])}")
    msg = reply.get("message")
    if not isinstance(msg, str) or not msg.strip():
        problems.append(f"no message: {msg!r}")
    elif not any(t.lower() in msg.lower() for t in exp["tokens"]):
        problems.append(f"message {msg[:200]!r} does not name {exp['tokens']}")
    return problems


def test_control_requests(mounter):
    mnt = mounter.mount("--memory", "1G")
    with Client(mnt) as c:
        page = c.mem_alloc(8192)
        c.subtree_add("relsub", DTB)
    fixed = [
        (b"", expect([errno.EINVAL], "JSON")),
        (b" ", expect([errno.EINVAL], "JSON")),
        (b"\r", expect([errno.EINVAL], "JSON")),
        (b"[" * 200000, expect([errno.EINVAL], "JSON")),
        (b"[" * 50000 + b"]" * 50000, expect([errno.EINVAL], "JSON")),
        (b'{"cmd": "status", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}",
         expect([errno.EINVAL], "JSON", "'x'")),
        (json.dumps({"cmd": "status", "pad": "A" * (8 << 20)}).encode(), expect([errno.EINVAL], "pad")),
        (json.dumps({"cmd": "Z" * (4 << 20)}).encode(), expect([errno.EOPNOTSUPP], "unknown command")),
        (b" " * (64 << 20) + b'{"cmd": "statusx"}', expect([errno.EOPNOTSUPP], "statusx")),
        (b'{"cmd": "mem_read", "phys": 0, "size": ' + b"9" * 5000 + b"}", expect([errno.EINVAL, errno.ERANGE], "JSON", "size")),
        (b'{"cmd": "preserve", "phys": 1e999, "size": 4096}', expect([errno.EINVAL], "'phys'")),
        (b'{"cmd": "preserve", "phys": NaN, "size": 4096}', expect([errno.EINVAL], "'phys'")),
        (b'{"cmd": "preserve", "phys": -Infinity, "size": 4096}', expect([errno.EINVAL], "'phys'")),
    ]
    cases = [(encode(r), e) for r, e in fixed]
    seen = {line for line, _ in cases}
    strategy = st.one_of(wrong_type(page), wrong_type(page), out_of_range(page), missing_field(page),
                         unknown_field(page), unknown_cmd, bad_cmd_type, not_object, not_json,
                         semantic(page), semantic(page), semantic(page))
    for req, exp in sup.collect_examples(strategy, 1000, seed=0x6B686F33,
                                         key=lambda x: encode(x[0])):
        line = encode(req)
        if line not in seen and b"\n" not in line:
            seen.add(line)
            cases.append((line, exp))

    # While finalized, valid preservation requests are refused with EBUSY.
    busy = [({"cmd": "preserve", "phys": page, "size": 4096 * k}, expect([errno.EBUSY], "finalized"))
            for k in range(1, 11)] + \
           [({"cmd": "preserve_folio", "phys": page, "order": 0, "count": k},
             expect([errno.EBUSY], "finalized")) for k in range(1, 11)] + \
           [({"cmd": "unpreserve", "phys": page, "size": 4096}, expect([errno.EBUSY], "finalized")),
            ({"cmd": "unpreserve_folio", "phys": page, "order": 0}, expect([errno.EBUSY], "finalized"))]

    failures = []
    obs = Client(mnt)
    conn = Conn(mnt)

    def run(line, exp):
        nonlocal obs, conn
        before = snapshot(obs)
        try:
            reply = conn.ask(line)
        except (ConnectionError, OSError, ValueError) as e:
            reply = f"no reply ({e})"
            conn.close()
            conn = Conn(mnt)
        problems = judge(reply, exp)
        after = snapshot(obs)
        if after != before:
            changed = [k for k in before[0] if before[0][k] != after[0].get(k)]
            problems.append(f"state changed (status fields {changed}, subtrees "
                            f"{before[1] != after[1]}, log {before[2] != after[2]})")
        if problems:
            shown = line if len(line) <= 120 else line[:100] + b"...(%d bytes)" % len(line)
            failures.append(f"{shown!r}: " + "; ".join(problems))

    try:
        for line, exp in cases:
            run(line, exp)
        fin = f"{mnt}/kho/out/finalize"
        sup.write_file(fin, b"1\n")
        for req, exp in busy:
            run(encode(req), exp)
        sup.write_file(fin, b"0\n")
        tried = len(cases) + len(busy)

        # Longer than the limit: E2BIG and the connection closes; others are served meanwhile.
        tried += 1
        problems = huge_line(mnt, obs)
        if problems:
            failures.append(f"{MAX_LINE + 4096}-byte line: " + "; ".join(problems))
        # A half-sent request and a hang-up: nothing happens, and the daemon still answers.
        before = snapshot(obs)
        s = socket.socket(socket.AF_UNIX)
        s.connect(runtime.paths(mnt)["sock"])
        s.sendall(b'{"cmd": "mem_alloc", "size": 4096')
        s.close()
        assert snapshot(obs) == before
        assert sup.read_file(fin) == b"0\n"
    finally:
        conn.close()
        obs.close()
    sup.check_family("control requests", tried, failures)


def huge_line(mnt, obs):
    problems = []
    before = snapshot(obs)
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(120)
    s.connect(runtime.paths(mnt)["sock"])
    blob = b"x" * (MAX_LINE + 4096)
    sent = []

    def send():
        try:
            s.sendall(blob)
        except OSError as e:
            sent.append(e)
    t = threading.Thread(target=send)
    t.start()
    slow = []
    deadline = time.monotonic() + 120
    while t.is_alive() and time.monotonic() < deadline:
        t0 = time.monotonic()
        obs.call("status")
        slow.append(time.monotonic() - t0)
        time.sleep(0.05)
    reply = s.makefile("rb").readline()
    t.join(30)
    s.close()
    try:
        r = json.loads(reply)
        if not (r.get("ok") is False and r.get("errno") == errno.E2BIG):
            problems.append(f"reply {reply[:200]!r}")
    except ValueError:
        problems.append(f"no reply ({reply[:100]!r})")
    if slow and max(slow) > 5:
        problems.append(f"other clients waited up to {max(slow):.1f}s meanwhile")
    if snapshot(obs) != before:
        problems.append("state changed")
    return problems
