"""The trio program behind one mount: the running system (host.py), the control server
(control.py) and the daemon's life (serve.py: mount, signals, readiness, shutdown).

Only this package and khofs.fs.fuse know trio; nothing here imports the CLI.
"""
