"""khofs image: a file kexec takes for a kernel of a given release (never bootable)."""

import os

from .common import EXIT_FAIL, EXIT_OK, EXIT_USAGE, err


def cmd_image(args) -> int:
    """khofs image --release R -o FILE."""
    from ..kernel.bzimage import make_image
    try:
        data = make_image(args.release)
    except ValueError as e:
        err(f"image: {e}")
        return EXIT_USAGE
    try:
        with open(args.output, "wb") as f:
            f.write(data)
    except OSError as e:
        err(f"image: cannot write {args.output}: {e.strerror}")
        return EXIT_FAIL
    os.chmod(args.output, 0o644)
    return EXIT_OK


def add_image(sub) -> None:
    """The image subcommand."""
    i = sub.add_parser("image", help="write a small kernel image file of a given release",
                       description="khofs image --release R -o FILE writes a 16 KiB x86 "
                       "bzImage setup header that both the kernel's and kexec-tools' bzImage "
                       "checks accept, with R as its kernel_version. It holds no kernel: only "
                       "khofs run can 'boot' it. R gives the next kernel's ABI profile; a "
                       "release before 6.16 boots a kernel without KHO.")
    i.add_argument("--release", required=True, help="uname -r of the image (no spaces)")
    i.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write it")
    i.set_defaults(func=cmd_image)
