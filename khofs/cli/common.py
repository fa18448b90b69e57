"""What every command shares: exit codes, argument types, the one-line error, the client."""

import argparse
import errno
import json
import os
import signal
import sys

from .. import runtime

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

PHYS_HELP = "physical address in simulated memory (decimal or 0x hex)"
SIZE_HELP = "bytes, with an optional K/M/G suffix"


def size_arg(text: str) -> int:
    """A memparse size (4G, 512M, 0x100000) for argparse."""
    from ..kernel.kstrtox import memparse
    val, n = memparse(text)
    if n != len(text.encode()) or val <= 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 4G, 512M, 0x100000)")
    return val


def release_arg(text: str) -> str:
    """A uname -r string for argparse."""
    if not (0 < len(text) <= 64 and text.isprintable()):
        raise argparse.ArgumentTypeError("a release is 1 to 64 printable characters (uname -r)")
    return text


def kernels_differ(abi: str | None, release: str | None) -> str | None:
    """Why an explicit --abi and a --release name different kernels, or None (a release
    with no version is only what uname -r prints)."""
    from ..kernel.profile import NO_KHO, release_profile_name
    named = release_profile_name(release)
    if abi is None or named is None or named == abi:
        return None
    what = "a kernel without KHO (before v6.16)" if named == NO_KHO else f"ABI {named}"
    return f"--abi {abi} contradicts --release {release}, which is {what}"


def num_arg(text: str) -> int:
    """A decimal or 0x-hex number for argparse."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (decimal or 0x hex)") from None


def err(msg: str) -> None:
    """The one-line error a command prints before a nonzero exit."""
    print(f"khofs: {msg}", file=sys.stderr)


def errno_name(n) -> str:
    """ENOMEM for 12; the number itself when it has no name."""
    return errno.errorcode.get(n, str(n))


def client(mnt):
    """A control client of the daemon serving mnt."""
    from ..client import Client
    return Client(mnt)


def print_result(args, result: dict, text: str | None = None) -> None:
    """result as JSON under --json, else text (when there is any)."""
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    elif text is not None:
        print(text)


def stop_lock_sleepers(mnt: str, info) -> bool:
    """If requests sleep on a kho_out.lock a 7.0 oops left held (their open files keep the
    mount busy), SIGTERM the daemon: it answers them EIO and unmounts itself. Whether it did."""
    from ..client import ControlError
    if not (info and runtime.pid_alive(info.get("pid", 0))):
        return False
    try:
        with client(mnt) as c:
            oops = c.status().get("oops")
    except ControlError:
        return False
    if not (oops and oops["lock_waiters"]):
        return False
    os.kill(info["pid"], signal.SIGTERM)
    return True


def oops_lines(st: dict) -> list:
    """khofs status's lines for a 7.0 oops (none without one)."""
    oops = st.get("oops")
    if not oops:
        return []
    return [f"oops:             {oops['bug']} in {oops['function']} "
            f"(pid {oops['pid']}, {oops['comm']}, killed)",
            f"oops cause:       {oops['cause']}",
            f"tainted:          {st['tainted']}",
            f"{oops['lock']}:     held until a kexec or a reboot; "
            f"{oops['lock_waiters']} request(s) asleep on it"]


def no_daemon(mountpoint: str, e: OSError) -> str:
    """The one line for a mount point whose daemon does not answer, with what to do."""
    from .. import runtime
    mnt = os.path.realpath(mountpoint)
    mounted = runtime.find_mount(mnt)
    if mounted and mounted[0] == "fuse.khofs":
        return (f"{mountpoint}: the khofs daemon of this mount is gone "
                f"({os.strerror(e.errno)}); clear it with: khofs umount {mountpoint}")
    if mounted:
        return f"{mountpoint} is a {mounted[0]} mount, not khofs"
    if runtime.read_info(mnt):
        return f"{mountpoint}: {e.strerror}"
    return (f"{mountpoint} is not a khofs mount (khofs list shows them; "
            f"khofs mount {mountpoint} makes one)")


def connect(mountpoint: str):
    """A client of mountpoint's daemon, or None after the one line saying why not."""
    from ..client import ControlError
    try:
        return client(mountpoint)
    except ControlError as e:
        err(no_daemon(mountpoint, e))
        return None
