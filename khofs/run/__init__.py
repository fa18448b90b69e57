"""khofs run: a tool runs unmodified on the emulated machine.

Host code, as the CLI is: it reaches the emulated kernel only through the control socket.
init (PID 1 of the run's namespaces) sets up the view, starts the tool under a seccomp
user-notification filter and answers its kexec, reboot, uname and mount calls.
"""


def run(mountpoint: str, argv, stderr=None) -> tuple[int, bool, list[str]]:
    """Run argv (a tool, unmodified) on the machine behind a khofs mount, as `khofs run`.
    (exit status, whether it kexec'd, the new kernel's boot lines); ValueError (one line)
    when the run cannot start: not root, no seccomp user notification, not a khofs mount."""
    from .launch import run as _run
    return _run(mountpoint, list(argv), stderr=stderr)
