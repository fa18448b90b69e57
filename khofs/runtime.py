"""Where a mount's daemon keeps its pid and log, found from the mount point alone."""

import fcntl
import hashlib
import json
import os
import time


def runtime_dir() -> str:
    """Where mounts' runtime files live: $KHOFS_RUNTIME_DIR if set, else /run/khofs as root."""
    if os.environ.get("KHOFS_RUNTIME_DIR"):
        base = os.environ["KHOFS_RUNTIME_DIR"]
    elif os.geteuid() == 0:
        base = "/run/khofs"
    else:
        base = os.path.join(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/khofs-{os.getuid()}", "khofs")
    os.makedirs(base, mode=0o700, exist_ok=True)
    return base


# Callers pass mount points already made absolute and resolved: resolving a path on a live
# mount from inside its own daemon before the FUSE loop runs would deadlock.
def mount_key(mountpoint: str) -> str:
    """The runtime files' name for a mount point."""
    return hashlib.sha256(mountpoint.encode()).hexdigest()[:16]


def paths(mountpoint: str) -> dict:
    """The info, log, socket and lock paths of a mount point."""
    base = os.path.join(runtime_dir(), mount_key(mountpoint))
    return {"info": base + ".json", "log": base + ".log", "sock": base + ".sock",
            "lock": base + ".lock"}


def lock_mountpoint(mountpoint: str, timeout: float = 10.0):
    """An fd holding the mount point's lock, or None if another daemon keeps it past timeout
    or mounts it meanwhile.

    The daemon holds it for its whole life, so two `khofs mount` racing on one mount point
    cannot both mount; the kernel drops it when the daemon dies, however it dies. A daemon
    that exits cleanly unlinks the file while still holding it (unlock_mountpoint), so a
    lock taken on an unlinked file is retried on the new one.
    """
    path = paths(mountpoint)["lock"]
    deadline = time.monotonic() + timeout
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline or find_mount(mountpoint):
                return None
            time.sleep(0.02)
            continue
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def unlock_mountpoint(mountpoint: str, fd: int) -> None:
    """Remove the lock file, then release it: the last thing a daemon does."""
    try:
        os.unlink(paths(mountpoint)["lock"])
    except FileNotFoundError:
        pass
    os.close(fd)


def clear_stale_lock(mountpoint: str) -> None:
    """Remove the lock file a killed daemon left, unless a live daemon holds it."""
    path = paths(mountpoint)["lock"]
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return
    unlock_mountpoint(mountpoint, fd)


def write_info(mountpoint: str, **info) -> None:
    """Record a mount's daemon info, atomically."""
    p = paths(mountpoint)["info"]
    tmp = p + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"mountpoint": mountpoint, **info}, f)
    os.replace(tmp, p)


def read_info(mountpoint: str):
    """A mount's daemon info, or None."""
    try:
        with open(paths(mountpoint)["info"]) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def remove_info(mountpoint: str) -> None:
    """Forget a mount's daemon info and socket."""
    for p in (paths(mountpoint)["info"], paths(mountpoint)["sock"]):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def _unescape(s: str) -> str:
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def find_mount(mountpoint: str):
    """The mountinfo entry (fstype, source) for the mount point, or None. Works for dead mounts."""
    target = mountpoint
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if _unescape(fields[4]) == target:
                found = (fields[sep + 1], fields[sep + 2])
    return found


def pid_alive(pid: int) -> bool:
    """Whether a daemon process is still running (a zombie has exited: only its parent,
    often init, has yet to reap it)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def all_infos() -> list[dict]:
    """The runtime info of every mount this runtime directory knows, by mount point."""
    base = runtime_dir()
    infos = []
    for name in sorted(os.listdir(base)):
        if name.endswith(".json"):
            try:
                with open(os.path.join(base, name)) as f:
                    info = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(info, dict) and isinstance(info.get("mountpoint"), str):
                infos.append(info)
    return sorted(infos, key=lambda i: i["mountpoint"])



def _mountinfo(path: str) -> list[tuple[str, str, str]]:
    """(mount point, major:minor, fstype) of each entry of a mountinfo file."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                out.append((_unescape(fields[4]), fields[2], fields[sep + 1]))
    except OSError:
        pass
    return out


def khofs_mount_of(path: str) -> str | None:
    """The mount point (as its daemon knows it) of the khofs mount that path is on, also
    through a bind mount or in another mount namespace: the mount holding path (from
    /proc/self/mountinfo) is fuse.khofs, and a daemon of this runtime directory mounted the
    same device (its own /proc/PID/mountinfo, or ours)."""
    path = os.path.realpath(path)
    best = None
    for mnt, dev, fstype in _mountinfo("/proc/self/mountinfo"):
        if path == mnt or path.startswith(mnt.rstrip("/") + "/"):
            if best is None or len(mnt) >= len(best[0]):
                best = (mnt, dev, fstype)
    if best is None or best[2] != "fuse.khofs":
        return None
    for info in all_infos():
        mine = info["mountpoint"]
        for where in (f"/proc/{info.get('pid')}/mountinfo", "/proc/self/mountinfo"):
            if any(m == mine and d == best[1] for m, d, _ in _mountinfo(where)):
                return mine
    return None
