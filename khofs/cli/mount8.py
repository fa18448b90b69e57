"""The mount(8) helper form: `khofs SOURCE MOUNTPOINT -o OPTIONS` as mount.fuse runs it."""

# Options of the mount(8) helper form that are khofs's own; the rest go to FUSE.
HELPER_KEYS = {"cmdline": "--cmdline", "memory": "--memory", "nodes": "--nodes",
               "boot_reserved": "--boot-reserved", "abi": "--abi", "release": "--release",
               "stat_size": "--stat-size", "state": "--state", "cache": "--cache",
               "replay": "--replay"}
# Generic mount options mount.fuse passes along; FUSE takes them from the mount flags.
GENERIC_FLAGS = {"rw", "ro", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "async", "sync",
                 "atime", "noatime", "relatime", "norelatime", "strictatime", "diratime",
                 "nodiratime", "defaults", "silent", "loud"}
FUSE_FLAGS = {"allow_other", "allow_root", "auto_unmount", "default_permissions", "debug"}


def split_mount_options(text: str) -> list[str]:
    """Split -o text on commas. mount.fuse splits values that contain commas (e.g. the
    kho_scratch= sizes) and joins them again, so a piece that is neither key=value nor a
    known flag continues the previous option. Double quotes around a value are removed."""
    out: list[str] = []
    for piece in text.split(","):
        key = piece.partition("=")[0]
        known = (not out or piece in GENERIC_FLAGS or piece in FUSE_FLAGS or
                 ("=" in piece and key.replace("_", "").isalnum() and key.isascii()))
        if known:
            out.append(piece)
        else:
            out[-1] += "," + piece
    result = []
    for opt in out:
        key, eq, val = opt.partition("=")
        if eq and len(val) >= 2 and val[0] == val[-1] == '"':
            val = val[1:-1]
        result.append(key + eq + val)
    return result


def helper_argv(argv: list[str], commands=None) -> list[str] | None:
    """`khofs SOURCE MOUNTPOINT [-o OPTS]`, as mount.fuse runs it, as a `mount` command."""
    if commands is None:
        from . import build_parser
        commands = build_parser().commands
    if len(argv) < 2 or argv[0] in commands or argv[0].startswith("-"):
        return None
    rest = argv[2:]
    opts = []
    while rest:
        if rest[0] == "-o" and len(rest) > 1:
            opts += split_mount_options(rest[1])
            rest = rest[2:]
        elif rest[0] == "-v":
            rest = rest[1:]
        else:
            return None
    out = ["mount", argv[1]]
    fuse_opts = []
    for opt in opts:
        key, eq, val = opt.partition("=")
        if key in HELPER_KEYS and eq:
            out += [HELPER_KEYS[key], val]
        elif opt in GENERIC_FLAGS or not opt:
            continue
        else:
            fuse_opts.append(opt)
    if fuse_opts:
        out += ["-o", ",".join(fuse_opts)]
    return out
