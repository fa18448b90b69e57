"""Preserve + finalize (+ kexec) cost as preserved memory grows; prints a table.

Each row runs in a fresh subprocess so peak RSS (ru_maxrss) belongs to that row alone.
Usage: python bench/scale.py [--abi PROFILE] [SIZES...]   (default: 6.18; 1G 64G 1T)
In 7.1 there is no finalize: the radix tree is the handed-over map, and "finalize s" is 0.
"""

import json
import resource
import subprocess
import sys
import time

MODES = ("order0", "2M", "mixed")


def run_one(size: int, mode: str, abi: str = "6.18") -> dict:
    from khofs.kernel.kstrtox import memparse  # noqa: F401
    from khofs.kernel.machine import Machine, MachineConfig
    mem = (1 << 32) + max(2 * size, 4 << 30)
    m = Machine("kho=on kho_scratch=64M,64M,64M", MachineConfig(memory=mem, abi=abi))
    kho = m.kho_out
    base = 1 << 32
    t0 = time.perf_counter()
    if mode == "order0":
        kho.preserve_folios(base, size >> 12, 0)
    elif mode == "2M":
        kho.preserve_folios(base, size >> 21, 9)
    else:
        half = size // 2
        kho.preserve_folios(base, half >> 12, 0)
        kho.preserve_pages(base + half, half)       # greedy split: large orders
    t1 = time.perf_counter()
    if m.profile.has_finalize:
        kho.set_finalize(1)
    t2 = time.perf_counter()
    rss_fin = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    m.kexec_load()
    ho = m.kexec_exec()
    nxt = Machine(ho.cmdline, MachineConfig(**ho.config), ho)
    t3 = time.perf_counter()
    assert nxt.preserved.total() >= size
    return {"preserve_s": t1 - t0, "finalize_s": t2 - t1, "kexec_s": t3 - t2,
            "bitmaps": (len(kho.track.leaves) if m.profile.radix else
                        sum(len(v) for v in kho.track.orders.values())),
            "rss_finalize_mib": rss_fin, "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv):
    if argv[:1] == ["--one"]:
        print(json.dumps(run_one(int(argv[1]), argv[2], argv[3])))
        return
    abi = "6.18"
    if argv[:1] == ["--abi"]:
        abi, argv = argv[1], argv[2:]
    from khofs.kernel.kstrtox import memparse
    sizes = argv or ["1G", "64G", "1T"]
    base = json.loads(subprocess.check_output([sys.executable, __file__, "--one", str(1 << 20),
                                               "order0", abi]))
    print(f"baseline process (1 MiB preserved): peak RSS {base['maxrss_mib']:.1f} MiB")
    print(f"{'size':>6} {'mode':>7} {'bitmaps':>8} {'preserve s':>11} {'finalize s':>11} "
          f"{'kexec s':>8} {'RSS@finalize':>13} {'RSS@kexec':>10}")
    for text in sizes:
        size = memparse(text)[0]
        for mode in MODES:
            r = json.loads(subprocess.check_output([sys.executable, __file__, "--one", str(size),
                                                    mode, abi]))
            print(f"{text:>6} {mode:>7} {r['bitmaps']:>8} {r['preserve_s']:>11.3f} "
                  f"{r['finalize_s']:>11.3f} {r['kexec_s']:>8.3f} {r['rss_finalize_mib']:>13.1f} "
                  f"{r['maxrss_mib']:>10.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
