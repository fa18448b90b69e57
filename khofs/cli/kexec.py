"""khofs kexec: load and exec the next kernel, together or as two steps."""

import json
import sys

from ..kernel.profile import NO_KHO, PROFILES
from .common import EXIT_FAIL, EXIT_OK, EXIT_USAGE, connect, err, errno_name, kernels_differ


def cmd_kexec(args) -> int:
    """khofs kexec [load|exec] MNT: the next kernel loaded, booted, or both."""
    from ..client import ControlError
    words = args.words
    if len(words) == 1:
        step, mnt = "both", words[0]
    elif len(words) == 2 and words[0] in ("load", "exec"):
        step, mnt = words
    else:
        args._parser.error("give one MOUNTPOINT, after load or exec if only that step")
    why = kernels_differ(args.abi, args.release)
    if why:
        err(why)
        return EXIT_USAGE
    fields = {}
    if args.cmdline is not None:
        fields["cmdline"] = args.cmdline
    if args.release is not None:
        fields["release"] = args.release
    if args.abi is not None:
        fields["abi"] = args.abi
    if step == "exec" and fields:
        err("--cmdline, --release and --abi go with the load step")
        return EXIT_USAGE
    c = connect(mnt)
    if c is None:
        return EXIT_FAIL
    try:
        with c:
            r = c.call({"both": "kexec", "load": "kexec_load", "exec": "kexec_exec"}[step], **fields)
    except ControlError as e:
        err(f"kexec: {e.strerror} [{errno_name(e.errno)}]")
        return EXIT_FAIL
    for note in r.get("notes", []):
        print(f"khofs: kexec: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(r, indent=2))
    elif step == "load":
        abi = "a kernel without KHO" if r["abi"] == NO_KHO else f"ABI {r['abi']}"
        print(f"loaded {r['release']} ({abi}): " + ("carries the KHO handover" if r["handover"]
                                                   else "carries no KHO handover"))
    else:
        for line in r["log"]:
            print(line)
    return EXIT_OK


def add_kexec(sub) -> None:
    """The kexec subcommand."""
    k = sub.add_parser("kexec", usage="khofs kexec [-h] [load|exec] MOUNTPOINT [--cmdline CMDLINE] "
                       "[--release RELEASE] [--abi {%s}] [--json]" % ",".join(PROFILES),
                       help="kexec the emulated kernel (load and exec, or one step)",
                       description="khofs kexec MNT = kexec -s -l + kexec -e; `khofs kexec load "
                       "MNT` and `khofs kexec exec MNT` are the two steps apart. In ABI 6.18 the "
                       "handover is attached at load time, and only if finalized. --abi boots a "
                       "kernel of another release, which judges the handover as that release "
                       "would.")
    k.add_argument("words", nargs="+", metavar="[load|exec] MOUNTPOINT",
                   help="the step (both when omitted) and a khofs mount point")
    k.add_argument("--cmdline", help="command line of the next kernel (default: the current one)")
    k.add_argument("--release", help="uname -r of the next kernel; its version picks the "
                   "profile (7.1.5 boots 7.1, 6.12.0 a kernel without KHO)")
    k.add_argument("--abi", choices=list(PROFILES),
                   help="ABI profile of the next kernel (default: the one --release names, "
                   "else the current one)")
    k.add_argument("--json", action="store_true", help="print the result as JSON")
    k.set_defaults(func=cmd_kexec)
