"""The ``pyunionfs`` command: argument parsing and one-line errors, nothing more."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import KNOWN_OPTIONS, build_config
from .errors import MountError, UsageError

_OPTIONS_HELP = "\n".join(f"  {k:<22} {v}" for k, v in KNOWN_OPTIONS.items())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyunionfs", description="A union filesystem in userspace, on disk compatible with overlayfs."
    )
    from . import __version__

    p.add_argument("--version", action="version", version=f"pyunionfs {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser(
        "mount",
        help="mount LOWER1:LOWER2:... over UPPER at MNT",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Mount the union of LOWER1:LOWER2:... (leftmost topmost; escape ':' and '\\' "
            "with a backslash) under the writable UPPER at MNT.  An empty UPPER (\"\") "
            "or -o ro makes a read-only mount.\n\noptions for -o:\n" + _OPTIONS_HELP
        ),
    )
    m.add_argument("lowers", metavar="LOWERS")
    m.add_argument("upper", metavar="UPPER")
    m.add_argument("mountpoint", metavar="MNT")
    m.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]")
    m.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    m.add_argument("--debug", action="store_true", help="log every request (implies -f logging to stderr)")
    m.add_argument("--log", metavar="FILE", help="where a background daemon writes its log")

    u = sub.add_parser("umount", help="unmount a pyunionfs mount and wait for its daemon")
    u.add_argument("mountpoint", metavar="MNT")
    u.add_argument("-z", "--lazy", action="store_true", help="detach now, finish when no longer busy")

    d = sub.add_parser("demo", help="build two small lowers and an upper, mount them, show the merged tree")
    d.add_argument("--keep", action="store_true", help="leave the demo's folder in place")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "mount":
            from .mount import mount

            cfg = build_config(args.lowers, args.upper, args.mountpoint, args.options, args.foreground, args.debug)
            if cfg.foreground:
                logging.basicConfig(
                    level=logging.DEBUG if cfg.debug else logging.INFO,
                    format="%(asctime)s pyunionfs %(levelname)s %(name)s: %(message)s",
                )
            return mount(cfg, args.log)
        if args.command == "umount":
            from .mount import unmount

            unmount(os.fsencode(os.path.abspath(args.mountpoint)), lazy=args.lazy)
            return 0
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(keep=args.keep)
    except UsageError as exc:
        print(f"pyunionfs: {exc}", file=sys.stderr)
        return 2
    except MountError as exc:
        print(f"pyunionfs: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
