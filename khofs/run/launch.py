"""Starting a run from the host side: checks, the namespaces, the result, the cleanup."""

import json
import os
import shutil
import signal
import subprocess
import sys

from .. import runtime
from . import notify

EXIT_FAIL = 1


def preflight(mnt: str) -> str | None:
    """Why a run cannot start here, or None."""
    if os.geteuid() != 0:
        return "run needs root (it makes mount and PID namespaces and answers kexec for the tool)"
    why = notify.available()
    if why:
        return f"run: {why}"
    if not runtime.find_mount(os.path.realpath(mnt)):
        return f"run: {mnt} is not a khofs mount"
    for tool in ("setpriv", "unshare"):
        if shutil.which(tool) is None:
            return f"run: {tool} (util-linux) is missing"
    return None


def _clean_stale(base: str) -> None:
    """View dirs of runs whose khofs run was killed before it could remove them."""
    for name in os.listdir(base):
        if name.startswith("run-") and name[4:].isdigit() and not runtime.pid_alive(int(name[4:])):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)


def run(mnt: str, argv: list[str], stderr=None) -> tuple[int, bool, list[str]]:
    """Run argv on the machine behind the khofs mount mnt.
    (exit status, whether it kexec'd, the new kernel's boot lines).
    ValueError when the run cannot start (the one-line reason)."""
    if not argv:
        raise ValueError("run: no command given (khofs run MNT -- CMD [ARGS...])")
    why = preflight(mnt)
    if why:
        raise ValueError(why)
    mnt = os.path.realpath(mnt)
    base = runtime.runtime_dir()
    _clean_stale(base)
    viewdir = os.path.join(base, f"run-{os.getpid()}")
    os.makedirs(viewdir, mode=0o755, exist_ok=True)
    rfd, wfd = os.pipe()
    cmd = ["setpriv", "--pdeathsig", "KILL", "unshare", "--mount-proc", "--pid", "--uts",
           "--fork", "--kill-child", sys.executable, "-m", "khofs.run.init", mnt,
           runtime.paths(mnt)["sock"], viewdir, str(wfd), "--", *argv]
    proc = None
    got = signal.SIGINT
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}

    def stop(sig, frame):
        nonlocal got
        got = sig
        raise KeyboardInterrupt
    try:
        for s in old:
            signal.signal(s, stop)
        proc = subprocess.Popen(cmd, pass_fds=[wfd], stderr=stderr)
        os.close(wfd)
        wfd = -1
        data = b""
        while chunk := os.read(rfd, 1 << 16):
            data += chunk
        code = proc.wait()
    except KeyboardInterrupt:
        if proc is not None:
            proc.kill()             # setpriv's pdeathsig and --kill-child take the run down
            proc.wait()
        return 128 + got, False, []
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        os.close(rfd)
        if wfd >= 0:
            os.close(wfd)
        shutil.rmtree(viewdir, ignore_errors=True)
    try:
        result = json.loads(data) if data else {}
    except ValueError:
        result = {}
    if not result:
        return (code if code else EXIT_FAIL), False, []
    return result.get("status", code), bool(result.get("kexec")), result.get("log", [])
