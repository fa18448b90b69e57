"""What a mount shows: the debugfs node tree over the kernel, and the pyfuse3 adapter over it.

debugfs.py knows the kernel and nothing of FUSE; fuse.py is the only module that speaks
pyfuse3. Neither prints for a user nor imports the daemon or the CLI.

Why direct I/O by default: on debugfs mmap(MAP_SHARED) fails with ENODEV and every read asks
the kernel; FUSE gives that only for direct_io opens, and it costs about what the bare
pyfuse3 floor's direct_io costs (README, Performance). `--cache page` opens read-only files
with keep_cache while their content is unchanged and invalidates them, before answering, on
every state change: the keep_cache floor's speed, at the price of mmap working. Write opens
stay direct either way, since a page locked by a write in flight could not be invalidated.
"""
