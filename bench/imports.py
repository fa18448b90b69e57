"""What `khofs mount` imports and what each top-level import costs (python -X importtime).

    .venv/bin/python bench/imports.py [--top N]

Mounts in the foreground with -X importtime, so the figures are the daemon's own: every
module it imports until it serves, then unmounts. Needs root and /dev/fuse.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

KHOFS = [sys.executable, "-m", "khofs"]


def mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def importtime(mnt: str) -> list[tuple[int, int, str]]:
    """(self us, cumulative us, name as printed) of each import of a foreground mount."""
    p = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "khofs", "mount", mnt, "-f"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not mounted(mnt):
        if p.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the mount did not come up: " + p.stderr.read()[-2000:])
        time.sleep(0.01)
    subprocess.check_call([*KHOFS, "umount", mnt])
    return parse(p.communicate(timeout=30)[1])


def floor_importtime() -> list[tuple[int, int, str]]:
    """The same for what the bare pyfuse3 + trio floor (bench/floor.py) imports."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", "import pyfuse3, trio"],
                         capture_output=True, text=True, check=True).stderr
    return parse(err)


def parse(err: str) -> list[tuple[int, int, str]]:
    rows = []
    for line in err.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        self_us, cum_us, name = line[len("import time:"):].split("|", 2)
        rows.append((int(self_us), int(cum_us), name.rstrip()))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    # An editable install run with PYTHONDONTWRITEBYTECODE would compile khofs every time.
    subprocess.run([sys.executable, "-m", "compileall", "-q", "khofs"], check=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   stdout=subprocess.DEVNULL)
    runs, floors = [], []
    with tempfile.TemporaryDirectory() as work:
        mnt = os.path.join(work, "mnt")
        os.mkdir(mnt)
        for _ in range(args.runs):          # interleaved: the machine's load hits both alike
            runs.append(importtime(mnt))
            floors.append(floor_importtime())

    def median_run(runs):
        # The run with the median total: one consistent set of rows.
        return sorted(runs, key=lambda rows: sum(r[0] for r in rows))[len(runs) // 2]
    rows, floor = median_run(runs), median_run(floors)
    total = sum(r[0] for r in rows)
    floor_names = {name.strip() for _, _, name in floor}
    above = [(us, name.strip()) for us, _, name in rows if name.strip() not in floor_names]
    print(f"bare pyfuse3 + trio imports {len(floor)} modules in "
          f"{sum(r[0] for r in floor) / 1000:.1f} ms; khofs mount imports "
          f"{len(above)} more in {sum(us for us, _ in above) / 1000:.1f} ms:")
    pkgs = {}
    for us, name in above:
        pkgs[name.split(".")[0]] = pkgs.get(name.split(".")[0], 0) + us
    print("  " + ", ".join(f"{p} {us / 1000:.1f}" for p, us in
                           sorted(pkgs.items(), key=lambda kv: -kv[1])))
    packages = {}
    for self_us, _, name in rows:
        pkg = name.strip().split(".")[0]
        packages[pkg] = packages.get(pkg, 0) + self_us
    print(f"\nkhofs mount imports {len(rows)} modules in {total / 1000:.1f} ms "
          f"(median of {args.runs} runs, -X importtime, which itself slows imports)")
    print(f"\n{'package (all its modules)':<40}{'ms':>14}")
    for pkg, us in sorted(packages.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{pkg:<40}{us / 1000:>14.1f}")
    khofs = sorted(((cum, name.strip()) for _, cum, name in rows
                    if name.strip().startswith("khofs")), reverse=True)
    print(f"\n{'khofs module':<40}{'cumulative ms':>14}")
    for cum, name in khofs[:args.top]:
        print(f"{name:<40}{cum / 1000:>14.1f}")


if __name__ == "__main__":
    main()
