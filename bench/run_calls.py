"""What a caught call costs under khofs run: uname(2) in a loop, plain and under the run.

    .venv/bin/python bench/run_calls.py [N]

Prints microseconds per call and the start-up of a run that does nothing. Needs root,
/dev/fuse and seccomp user notification. Not part of the tests.
"""

import os
import subprocess
import sys
import tempfile
import time

LOOP_C = r"""
#include <stdlib.h>
#include <sys/utsname.h>
int main(int c, char **v) { struct utsname u; long n = atol(v[1]);
  for (long i = 0; i < n; i++) uname(&u); return 0; }
"""


def timed(argv) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True)
    return time.perf_counter() - t


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    khofs = [sys.executable, "-m", "khofs"]
    with tempfile.TemporaryDirectory() as d:
        src, exe, mnt = os.path.join(d, "l.c"), os.path.join(d, "l"), os.path.join(d, "m")
        with open(src, "w") as f:
            f.write(LOOP_C)
        subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)
        os.mkdir(mnt)
        subprocess.run(khofs + ["mount", mnt], check=True)
        try:
            run = khofs + ["run", mnt, "--"]
            empty = min(timed(run + ["true"]) for _ in range(3))
            plain = min(timed([exe, str(n)]) for _ in range(3))
            caught = min(timed(run + [exe, str(n)]) for _ in range(3))
        finally:
            subprocess.run(khofs + ["umount", mnt], check=True)
    print(f"khofs run of /bin/true:        {empty * 1e3:8.1f} ms")
    print(f"uname(2), host:                {plain / n * 1e6:8.2f} us/call")
    print(f"uname(2), under khofs run:     {(caught - empty) / n * 1e6:8.2f} us/call "
          f"(the notification round trip)")


if __name__ == "__main__":
    main()
