"""khofs run: a tool runs unmodified on the emulated machine.

Host code, as the CLI is: it reaches the emulated kernel only through the control socket.
init (PID 1 of the run's namespaces) sets up the view, starts the tool under a seccomp
user-notification filter and answers its kexec, reboot, uname and mount calls.
"""
