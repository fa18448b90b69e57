"""What a mount shows: the debugfs node tree over the kernel, and the pyfuse3 adapter over it.

debugfs.py knows the kernel and nothing of FUSE; fuse.py is the only module that speaks
pyfuse3. Neither prints for a user nor imports the daemon or the CLI.
"""
