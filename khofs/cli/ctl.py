"""khofs ctl: act on the emulated kernel as a kernel subsystem would, through the control socket."""

import base64
import sys

from .common import (EXIT_FAIL, EXIT_OK, PHYS_HELP, SIZE_HELP, connect, err, errno_name,
                     num_arg, print_result, size_arg)


def _read_input(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as f:
        return f.read()


def _load_blob(path: str, c) -> bytes:
    """An FDT as is, DTS compiled; on a kernel that takes any blob (kho-v3), other bytes as is."""
    data = _read_input(path)
    if data[:4] == b"\xd0\x0d\xfe\xed":
        return data
    from ..devicetree.dts import DtsError, dts_to_dtb
    try:
        return dts_to_dtb(data)
    except DtsError as e:
        if c.status()["any_blob"]:
            return data
        raise ValueError(f"{'stdin' if path == '-' else path}: {e}") from None


def cmd_ctl(args) -> int:
    """khofs ctl MNT ACTION: one control request, its result printed."""
    from ..client import ControlError
    c = connect(args.mountpoint)
    if c is None:
        return EXIT_FAIL
    try:
        with c:
            return _ctl(args, c)
    except ControlError as e:
        err(f"{args.mountpoint}: {e.strerror} [{errno_name(e.errno)}]")
        return EXIT_FAIL
    except OSError as e:
        err(f"cannot read {e.filename}: {e.strerror}" if e.filename else str(e))
        return EXIT_FAIL
    except ValueError as e:
        err(str(e))
        return EXIT_FAIL


def _ctl(args, c) -> int:
    a = args.action
    if a == "mem":
        if args.mem_action == "alloc":
            r = c.call("mem_alloc", size=args.size)
            print_result(args, r, f"0x{r['phys']:x}")
        elif args.mem_action == "free":
            c.call("mem_free", phys=args.phys)
        elif args.mem_action == "write":
            data = _read_input(args.file)
            r = c.call("mem_write", phys=args.phys, data=base64.b64encode(data).decode())
            print_result(args, r)
        elif args.mem_action == "read":
            sys.stdout.buffer.write(c.mem_read(args.phys, args.size))
            sys.stdout.flush()
    elif a == "subtree":
        if args.sub_action == "add":
            r = c.call("subtree_add", name=args.name,
                       blob=base64.b64encode(_load_blob(args.file, c)).decode(),
                       preserve=not args.no_preserve)
            print_result(args, r, f"0x{r['phys']:x}")
        elif args.sub_action == "remove":
            c.call("subtree_remove", name=args.name)
        else:
            r = c.call("subtree_list")
            rows = [f"{s['name']}\t0x{s['phys']:x}\t{s['size']}" +
                    ("" if s["preserve"] else "\tno-preserve") for s in r["subtrees"]]
            print_result(args, r, "\n".join(rows) or None)
    elif a == "preserve":
        c.call("preserve", phys=args.phys, size=args.size)
    elif a == "unpreserve":
        c.call("unpreserve", phys=args.phys, size=args.size)
    elif a == "preserve-folio":
        c.call("preserve_folio", phys=args.phys, order=args.order, count=args.count)
    elif a == "unpreserve-folio":
        c.call("unpreserve_folio", phys=args.phys, order=args.order)
    elif a == "fail":
        c.call("fail", op=args.op, errno=args.errno)
    elif a == "test-kho":
        c.call("test_kho", **({"seed": args.seed} if args.seed is not None else {}))
    elif a == "log":
        r = c.call("log")
        print_result(args, r, "\n".join(r["lines"]))
    return EXIT_OK


def add_ctl(sub) -> None:
    """The ctl subcommand and its actions."""
    c = sub.add_parser("ctl", help="act as a kernel subsystem: memory, preservation, subtrees, faults",
                       description="Drive the emulated kernel the way a kernel subsystem would: "
                       "allocate and fill simulated memory, preserve it, register sub-FDTs, "
                       "inject failures. Addresses take 0x hex; sizes take K/M/G suffixes. "
                       "Protocol: docs/control-protocol.md.")
    c.add_argument("mountpoint", metavar="MOUNTPOINT", help="a khofs mount point")
    c.add_argument("--json", action="store_true", help="print results as JSON")
    csub = c.add_subparsers(dest="action", metavar="ACTION", required=True)
    mem = csub.add_parser("mem", help="simulated physical memory")
    msub = mem.add_subparsers(dest="mem_action", required=True)
    x = msub.add_parser("alloc", help="allocate SIZE bytes (whole pages); prints the address")
    x.add_argument("size", type=size_arg, help=SIZE_HELP)
    x = msub.add_parser("free", help="free an allocation")
    x.add_argument("phys", type=num_arg, help="the address mem alloc printed")
    x = msub.add_parser("write", help="write a file's bytes (or - for stdin) at PHYS")
    x.add_argument("phys", type=num_arg, help=PHYS_HELP)
    x.add_argument("file", help="a file, or - for standard input")
    x = msub.add_parser("read", help="write SIZE bytes at PHYS to stdout")
    x.add_argument("phys", type=num_arg, help=PHYS_HELP)
    x.add_argument("size", type=size_arg, help=SIZE_HELP)
    sb = csub.add_parser("subtree", help="a producer's sub-FDT")
    ssub = sb.add_subparsers(dest="sub_action", required=True)
    x = ssub.add_parser("add", help="register NAME with a .dts or .dtb, or on 7.1 any bytes "
                        "(or - for stdin)")
    x.add_argument("name", help="the subtree's node name (out/sub_fdts/NAME)")
    x.add_argument("file", help="a .dts or .dtb file (7.1: any file, raw bytes), or - for stdin")
    x.add_argument("--no-preserve", action="store_true",
                   help="do not preserve the blob's pages (the classic misuse)")
    x = ssub.add_parser("remove", help="unregister NAME")
    x.add_argument("name", help="a name given to subtree add")
    ssub.add_parser("list", help="registered subtrees")
    for name, hlp in (("preserve", "kho_preserve_pages of [PHYS, PHYS+SIZE)"),
                      ("unpreserve", "kho_unpreserve_pages of [PHYS, PHYS+SIZE)")):
        x = csub.add_parser(name, help=hlp)
        x.add_argument("phys", type=num_arg, help=PHYS_HELP + ", page aligned")
        x.add_argument("size", type=size_arg, help=SIZE_HELP + ", whole pages")
    x = csub.add_parser("preserve-folio", help="kho_preserve_folio of an order-ORDER folio")
    x.add_argument("phys", type=num_arg, help=PHYS_HELP + ", aligned to the folio size")
    x.add_argument("order", type=int, help="folio order: 2**ORDER pages")
    x.add_argument("--count", type=int, default=1, help="COUNT consecutive folios")
    x = csub.add_parser("unpreserve-folio", help="kho_unpreserve_folio")
    x.add_argument("phys", type=num_arg, help=PHYS_HELP)
    x.add_argument("order", type=int, help="folio order: 2**ORDER pages")
    x = csub.add_parser("fail", help="the next OP (finalize|abort) fails with ERRNO (e.g. ENOMEM)")
    x.add_argument("op", choices=["finalize", "abort"], help="which operation fails")
    x.add_argument("errno", help="errno name (ENOMEM) or number")
    x = csub.add_parser("test-kho", help="load the KHO test module now")
    x.add_argument("--seed", type=int, help="seed for the folio orders and contents")
    csub.add_parser("log", help="the kernel log of this boot")
    c.set_defaults(func=cmd_ctl)
