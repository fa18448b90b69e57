"""The trio program behind one mount: the running system (host.py), the control server
(control.py) and the daemon's life (serve.py: mount, signals, readiness, shutdown).

Only this package and khofs.fs.fuse know trio; nothing here imports the CLI.

Why one trio thread: the emulated kernel is one state machine that FUSE requests and control
requests both change. Run on one trio loop (pyfuse3's workers, the control server and the
signal receiver in one nursery) each request runs to its next await alone, so the kernel
needs no locks and a request sees either all of a state change or none of it. What can
block on the kernel's reply, the cache invalidations, goes to trio's worker threads.
"""
