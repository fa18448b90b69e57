"""Bad input, family (d): kernel command lines with garbage kho=, kho_scratch=, reserve_mem=.

Machine(cmdline) must never raise except ValueError for a machine that cannot exist, and what
it does must follow the kernel's parse rules (early params via parameq and kstrtobool,
kho_parse_scratch_size of 6.18, reserve_mem()), computed here by our own oracles. Each case
runs in a forked child so that a crash is a counted failure.
"""

import errno

from hypothesis import strategies as st

import khofs_rel_support as sup
from khofs.kernel.machine import Machine, MachineConfig

G = 1 << 30
M = 1 << 20

# Values never contain the kernel's whitespace or quotes (so the split is unambiguous), but
# may contain other control characters.
VALUE_CHARS = "".join(chr(c) for c in range(1, 127) if chr(c) not in ' \t\n\v\f\r"')
junk = st.text(alphabet=VALUE_CHARS, min_size=0, max_size=12)
SUFFIX = st.sampled_from(["", "", "K", "M", "G", "T", "P", "E", "k", "m", "g", "e", "B", "KB", "x",
                          "%", "\x1c", "\x1f"])


@st.composite
def number(draw):
    prefix = draw(st.sampled_from(["", "", "", "0", "0x", "0X", "+", "-", "00"]))
    digits = draw(st.one_of(st.text(alphabet="0123456789", min_size=0, max_size=4),
                            st.text(alphabet="0123456789abcdefABCDEF", min_size=0, max_size=20),
                            st.sampled_from(["18446744073709551615", "18446744073709551616",
                                             "ffffffffffffffff", "8", "16"])))
    return prefix + digits + draw(SUFFIX)


kho_value = st.one_of(
    st.sampled_from(["on", "off", "1", "0", "y", "n", "yes", "no", "true", "false", "t", "f",
                     "e", "d", "enable", "disable", "On", "OFF", "oN", "of", "o", "O", "",
                     "2", "-1", "Y", "N", " on", "x", "\x1con"]),
    junk, st.none())

scratch_value = st.one_of(
    st.builds(lambda a, s1, b, s2, c, tail: a + s1 + b + s2 + c + tail,
              number(), st.sampled_from([",", ",", ",", ";", ",,", ""]),
              number(), st.sampled_from([",", ",", ",", ":", ""]), number(),
              st.sampled_from(["", "", "", ",", "x", ",1M", "\x1c", "%"])),
    st.builds(lambda n, pct: n + pct, st.one_of(number(), junk),
              st.sampled_from(["%", "%", "%%", ""])),
    st.sampled_from(["200%", "+50%", "0%", "4294967295%", "4294967296%", "12345678901%", "%",
                     "0x10%", "0,0,0", "16M,64M,16M", "1E,1E,1E", "8E,8E,0", "0,0,1",
                     "2M,2M,2M", "1,1,1", "16M,64M", "16M,64M,16M,", "16M,,16M",
                     "16M,64M,16M\x1c", "2M,2M,2M\x1f", "\x1e16M,64M,16M"]),
    junk, st.none())

name_value = st.one_of(st.text(alphabet=VALUE_CHARS, min_size=0, max_size=18),
                       st.sampled_from(["oops", "a", "x" * 15, "x" * 16, "ram:oops"]))
reserve_value = st.one_of(
    st.builds(lambda size, s1, align, s2, name: size + s1 + align + s2 + name,
              number(), st.sampled_from([":", ":", ":", ",", ""]),
              st.one_of(number(), st.just("")), st.sampled_from([":", ":", ":", ""]), name_value),
    st.sampled_from(["4M:4096:oops", "1M:0:a", "0:0:zero", "1M:1M:", "1G:64:big",
                     "3G:4096:huge", "1M:1E:alig", "4M:4096:oo\x1cps", "1M:64:\x1f"]),
    junk, st.none())

param = st.one_of(
    st.tuples(st.sampled_from(["kho", "kho", "kho", "KHO", "khox"]), kho_value),
    st.tuples(st.sampled_from(["kho_scratch", "kho_scratch", "kho_scratch", "kho-scratch",
                               "kho_scratchx"]), scratch_value),
    st.tuples(st.just("reserve_mem"), reserve_value),
    st.tuples(st.sampled_from(["quiet", "--", "console", "root"]),
              st.one_of(st.none(), st.just("ttyS0"))))

# (memory, nodes, boot_reserved): mostly real machines, some that cannot exist.
CONFIGS = [(2 * G, 1, 64 * M)] * 6 + [
    (1 * G, 1, 64 * M), (4 * G, 2, 64 * M), (512 * M, 3, 32 * M), (64 * M, 1, 8 * M),
    (48 * M, 2, 1 * M), (16 * M, 1, 1 * M), (30 * M, 2, 1 * M), (2 * G, 1, 2 * G),
    (1 * G, 2, 500 * M), (2 * G, 0, 64 * M), (6 * G, 1, 64 * M)]

case = st.tuples(st.lists(param, min_size=1, max_size=5),
                 st.lists(st.sampled_from([" ", " ", " ", "  ", "\t", "\n"]), min_size=6,
                          max_size=6),
                 st.sampled_from(CONFIGS))


def build_cmdline(params, seps):
    words = [p if v is None else f"{p}={v}" for p, v in params]
    out = ""
    for i, w in enumerate(words):
        out += (seps[i] if i else "") + w
    return out


def expected(cmdline, cfg):
    """What the kernel (and the machine model) must do with this command line."""
    memory, nodes, boot_reserved = cfg
    per_node = (memory // nodes) // (2 * M) * (2 * M) if nodes >= 1 else 0
    if nodes < 1 or per_node < 16 * M or 16 * M + boot_reserved > per_node:
        return {"valueerror": True}
    kho = False
    malformed = []
    scale, sizes = 200, [0, 0, 0]
    for p, v in sup.kernel_params(cmdline):
        if sup.parameq(p, "kho"):
            r = sup.kstrtobool_oracle(v)
            if r is None:
                malformed.append(p)
            else:
                kho = r
        elif sup.parameq(p, "kho_scratch"):
            r = sup.kho_scratch_oracle(v)
            if r is None:
                malformed.append(p)
            elif r[0] == "scale":
                scale = r[1]
            else:
                scale, sizes = 0, r[1]
    reserve = [v for p, v in sup.kernel_params(cmdline) if p == "reserve_mem"]
    return {"valueerror": False, "kho": kho, "malformed": malformed, "scale": scale,
            "sizes": sizes, "reserve": reserve, "memory": memory, "nodes": nodes,
            "per_node": per_node, "boot_reserved": boot_reserved}


def check_case(item):
    params, seps, cfg = item
    cmdline = build_cmdline(params, seps)
    exp = expected(cmdline, cfg)
    problems = []
    memory, nodes, boot_reserved = cfg
    try:
        m = Machine(cmdline, MachineConfig(memory=memory, nodes=nodes, boot_reserved=boot_reserved))
    except ValueError as e:
        if not exp["valueerror"]:
            problems.append(f"ValueError for a possible machine: {e}")
        return problems
    if exp["valueerror"]:
        return [f"no ValueError for an impossible machine {cfg}"]

    dmesg = [line.text for line in m.dmesg]
    got_malformed = [t[len("Malformed early option '"):-1] for t in dmesg
                     if t.startswith("Malformed early option '")]
    if got_malformed != exp["malformed"]:
        problems.append(f"'Malformed early option' for {got_malformed}, kernel: {exp['malformed']}")

    # reserve_mem=: parse exactly; allocation is certain only for small or impossible sizes.
    names, table = [], [r.name.encode() for r in m.reserve_mem]
    reserved_total = 0
    for val in exp["reserve"]:
        r = sup.reserve_mem_oracle(val, names, len(names))
        if isinstance(r, int):
            continue
        size, align, name = r
        fits = size <= 64 * M and align <= 64 * M and memory >= G
        impossible = size > memory or (align > memory and align & (align - 1) == 0)
        placed = name in table and name not in names
        if fits and not placed:
            problems.append(f"reserve_mem={val}: a {size:#x}-byte region was not reserved")
        if impossible and placed:
            problems.append(f"reserve_mem={val}: reserved although it cannot fit")
        if placed:
            names.append(name)
            reserved_total += size
    if table != names:
        problems.append(f"reserve_mem regions {table}, kernel parse gives {names}")

    scratch_lines = m.scratch_len_text().decode().split()
    got_sizes = [int(x, 16) for x in scratch_lines]
    if not exp["kho"]:
        if m.kho_enable or m.kho_out is not None:
            problems.append("KHO enabled although kho= did not turn it on")
        return problems
    failed_warn = "KHO: Failed to reserve scratch area, disabling kexec handover" in dmesg
    if not m.kho_enable and not failed_warn:
        problems.append("KHO off although kho= turns it on (and scratch did not fail)")
        return problems
    if m.kho_enable and failed_warn:
        problems.append("KHO on although scratch reservation failed")
    scale, (lo, gl, pn) = exp["scale"], exp["sizes"]
    small = nodes == 1 and memory >= 2 * G and boot_reserved <= 64 * M and reserved_total <= 64 * M
    if scale:
        low_k = boot_reserved + reserved_total          # every kernel reservation is below 4 GiB
        want_low = sup.kround_up(low_k * scale // 100, 2 * M)
        if m.kho_enable and memory <= 4 * G and nodes == 1:
            want = [want_low, sup.kround_up(low_k * scale // 100 - want_low, 2 * M)]
            if got_sizes[:2] != want:
                problems.append(f"scale {scale}%: lowmem/global {got_sizes[:2]}, expected {want}")
        if small and scale <= 200 and not m.kho_enable:
            problems.append(f"scale {scale}% on a 2 GiB machine: scratch did not fit")
    else:
        want = [lo, gl] + [sup.kround_up(pn, 2 * M)] * nodes
        if m.kho_enable and got_sizes != want:
            problems.append(f"scratch sizes {got_sizes}, kho_scratch gives {want}")
        if small and max(lo, gl, sup.kround_up(pn, 2 * M)) <= 64 * M and not m.kho_enable:
            problems.append(f"scratch {want} did not fit on a 2 GiB machine")
        if m.kho_enable and (lo > memory or gl > memory or sup.kround_up(pn, 2 * M) > exp["per_node"]):
            problems.append(f"scratch {want} reserved on a {memory:#x}-byte machine")
    if m.kho_enable:
        if len(got_sizes) != nodes + 2:
            problems.append(f"{len(got_sizes)} scratch lines for {nodes} node(s)")
        m.kho_out.set_finalize(1)            # the booted kernel works
    return problems


def test_cmdline_garbage():
    cases = sup.collect_examples(case, 1200, seed=0x6B686F34,
                                 key=lambda c: (build_cmdline(c[0], c[1]), c[2]))
    results = sup.run_isolated(cases, check_case, timeout=10, parallel=2)
    failures = []
    for (params, seps, cfg), res in zip(cases, results):
        cmd = build_cmdline(params, seps)
        if res["status"] != "ok":
            failures.append(f"{cmd!r} {cfg}: {res['status']}: {res.get('error')}")
        elif res["result"]:
            failures.append(f"{cmd!r} {cfg}: " + "; ".join(res["result"]))
    sup.check_family("command lines", len(cases), failures)


def test_oracle_agrees_with_spec_examples():
    # The oracles themselves, on the spec's own examples (KHO-SPEC §1, §6, §10).
    assert sup.kstrtobool_oracle("on") is True and sup.kstrtobool_oracle("off") is False
    assert sup.kstrtobool_oracle("oops") is None and sup.kstrtobool_oracle(None) is None
    assert sup.kho_scratch_oracle("16M,64M,16M") == ("sizes", [16 * M, 64 * M, 16 * M])
    assert sup.kho_scratch_oracle("0,0,0") is None
    assert sup.kho_scratch_oracle("0,0,1") == ("sizes", [0, 0, 1])
    assert sup.kho_scratch_oracle("16M,64M,16Mx") is None
    assert sup.kho_scratch_oracle("4294967295%") == ("scale", 0xFFFFFFFF)
    assert sup.kho_scratch_oracle("4294967296%") is None
    assert sup.reserve_mem_oracle("4M:4096:oops", [], 0) == (4 * M, 4096, b"oops")
    assert sup.reserve_mem_oracle("4M:4096:oops", [b"oops"], 1) == errno.EBUSY
    assert sup.kernel_params('kho=on  a\tb=1 -- kho=off') == [("kho", "on"), ("a", None), ("b", "1")]
