"""The command line of fuse-overlayfs and of mount.fuse3, translated.

Container storage libraries (containers/storage's ``mount_program``, used by
podman and buildah) run a FUSE overlay "mount program" as::

    PROGRAM -o lowerdir=L1:L2,upperdir=U,workdir=W[,more] MNT

(options may also come after MNT, ``-o`` may repeat), and ``mount -t
fuse.pyunionfs`` (or an fstab line) makes mount.fuse3 run::

    pyunionfs SOURCE MNT -o OPTS

Both become the :func:`~pyunionfs.config.build_config` call of ``pyunionfs
mount`` and mount in the background the same way (the command returns once
the mount is live); SOURCE, as for fuse-overlayfs, is the mount's source in
the mount table unless ``fsname=`` names one.  Every option fuse-overlayfs, the kernel's overlayfs,
libfuse or mount(8) may hand over is in :data:`pyunionfs.options.TABLE`, with
what pyunionfs does with it; anything else is refused, as ``pyunionfs mount``
refuses it.

This module also decides, for the one dispatcher
(:func:`pyunionfs.cli.commands.main`), whether a command line is this form,
a subcommand, or a mistyped subcommand (:func:`route`).
"""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import NamedTuple

from ..errors import UsageError
from ..options import TABLE, Form, Use, plain, read, split_items

#: Where ``install-helper`` links the command by default: the first directory
#: of the search path mount.fuse3's /bin/sh falls back to (mount(8) runs its
#: helpers without PATH) and of systemd's PATH for fstab mounts.
HELPER_DIR = "/usr/local/sbin"


# -- reading the command line ---------------------------------------------------


@dataclass
class Invocation:
    """What a drop-in command line asks for, ready for build_config."""

    mountpoint: str = ""
    source: str | None = None  #: the SOURCE before MNT (mount.fuse3): the mount's source
    lowers: str | None = None
    upper: str = ""
    workdir: str | None = None
    options: list[str] = field(default_factory=list)  #: for build_config (options pyunionfs mount -o takes)
    warnings: list[str] = field(default_factory=list)
    foreground: bool = False
    debug: bool = False
    log: str | None = None
    help: bool = False
    version: bool = False


class Route(NamedTuple):
    """What a command line is: the drop-in form, or a subcommand's (then perhaps mistyped)."""

    dropin: bool
    meant: str | None = None  #: a first word that is no subcommand but close to this one


def route(argv: list[str], subcommands: Collection[str]) -> Route:
    """Decide, once, what *argv* is: the fuse-overlayfs / mount.fuse3 form, a
    subcommand, or a mistyped subcommand (with the name meant).

    The drop-in form starts with an option (``-o``, ``-f``...) or with
    mount.fuse3's SOURCE.  A subcommand's name wins, unless the line has a
    ``lowerdir=`` (``mount -t fuse.pyunionfs mount MNT -o lowerdir=...``: a
    SOURCE that happens to be a subcommand's name).  A first word that is
    neither, with no ``lowerdir=``, is the drop-in form only if it has ``-o``
    options and is not close to a subcommand's name: ``mout L U M`` and
    ``umonut M`` are mistyped subcommands, which argparse refuses naming the
    one meant (so a typo never mounts anything).
    """
    if not argv or argv[0] in ("-h", "--help", "--version"):
        return Route(False)
    names = sorted(subcommands)  # the parser's own list: a new subcommand is known here at once
    groups = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-o"]
    groups += [a[2:] for a in argv if a.startswith("-o") and len(a) > 2]
    has_lowerdir = any(item.startswith("lowerdir=") for g in groups for item in split_items(g))
    if argv[0] in names:
        return Route(argv[0] != "commit" and has_lowerdir)  # commit's -o names the output file
    if argv[0].startswith("-") or has_lowerdir:
        return Route(True)
    import difflib  # only for a typo: not paid by every mount

    close = difflib.get_close_matches(argv[0], names, n=1)
    return Route(bool(groups) and not close, close[0] if close else None)


def is_overlay_form(argv: list[str], subcommands: Collection[str]) -> bool:
    """Whether *argv* is the fuse-overlayfs / mount.fuse3 form, not a subcommand (see :func:`route`)."""
    return route(argv, subcommands).dropin


def parse_argv(argv: list[str]) -> Invocation:
    """Read ``[-f] [-d] [-o OPTS]... [SOURCE] MNT [-o OPTS]...``; raise UsageError."""
    inv = Invocation()
    positionals: list[str] = []
    groups: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--":
            positionals.extend(args)
        elif arg == "-o":
            group = next(args, None)
            if group is None:
                raise UsageError("-o needs an argument (-o lowerdir=...,upperdir=...,workdir=...)")
            groups.append(group)
        elif arg.startswith("-o"):
            groups.append(arg[2:])
        elif arg == "-f":
            inv.foreground = True
        elif arg in ("-d", "--debug"):
            inv.debug = inv.foreground = True  # as libfuse's -d
        elif arg == "-s":
            pass  # single-threaded: pyunionfs has one request loop anyway
        elif arg in ("-h", "--help"):
            inv.help = True
        elif arg in ("-V", "--version"):
            inv.version = True
        elif arg == "--log" or arg.startswith("--log="):
            inv.log = arg[6:] if arg.startswith("--log=") else next(args, None)
            if not inv.log:
                raise UsageError("--log needs a file name")
        elif arg.startswith("-") and arg != "-":
            raise UsageError(f"unknown argument {arg!r} (pyunionfs -h shows the usage)")
        else:
            positionals.append(arg)
    if inv.help or inv.version:
        return inv
    if not positionals:
        raise UsageError("no mountpoint given (pyunionfs -o lowerdir=L1:L2,upperdir=U,workdir=W MNT)")
    if len(positionals) > 2:
        raise UsageError(f"too many arguments: {' '.join(positionals)!r} (expected [SOURCE] MNT)")
    inv.mountpoint = positionals[-1]
    inv.source = positionals[0] if len(positionals) == 2 else None  # a label: the mount's source
    _read_options(inv, [item for g in groups for item in split_items(g)])
    if inv.lowers is None:
        raise UsageError("no lowerdir= given (pyunionfs -o lowerdir=L1:L2,upperdir=U,workdir=W MNT)")
    return inv


def _read_options(inv: Invocation, items: list[str]) -> None:
    """Act on each option as the table says: the layers and ro/rw here, honoured ones
    on to build_config, a warning for those the mount will not show, nothing for the rest."""
    readonly = False
    passed: list[str] = []
    form = Form.FUSE3 if inv.source is not None else Form.OVERLAY
    for given in read(items, form, inv.mountpoint):
        opt, key = given.row, given.key
        if key == "lowerdir":
            inv.lowers = given.raw or ""  # escapes left for split_layers
        elif key == "upperdir":
            if not given.value:
                raise UsageError("empty upperdir= (leave it out for a read-only mount)")
            inv.upper = given.value
        elif key == "workdir":
            inv.workdir = given.value or None
        elif key in ("ro", "rw"):
            readonly = key == "ro"  # the last one wins, as for mount(8)
        elif opt.use is Use.HONOURED:
            passed.append(given.item)
        elif opt.use is Use.WARNED and given.value not in opt.quiet:
            inv.warnings.append(f"{key}{'=' if opt.takes_value else ''} ignored: {plain(opt.help)}")
    if readonly:
        passed.append("ro")
    inv.options = passed
    inv.warnings = list(dict.fromkeys(inv.warnings))


# -- help ------------------------------------------------------------------------


USAGE = "pyunionfs [-f] [-d] [--log FILE] -o lowerdir=L1:L2,upperdir=U,workdir=W[,OPT...] [SOURCE] MNT"


def help_text() -> str:
    """The drop-in form's usage and option names, from the option table (details: docs/options.md)."""
    by_use: dict[str, list[str]] = {}
    for o in TABLE:
        if Form.OVERLAY in o.forms:
            by_use.setdefault(o.use.value.split(",")[0], []).append(o.spelling)
    lines = [
        "the fuse-overlayfs and mount.fuse3 form:",
        f"  {USAGE}",
        "  (-o may repeat and may come after MNT; SOURCE is the mount's source unless fsname= is given.",
        "  Returns once the mount is live.)",
    ]
    for use in ("honoured", "ignored"):
        lines.append(textwrap.fill(" ".join(by_use[use]), 100, initial_indent=f"  {use} options: ",
                                   subsequent_indent="    ", break_on_hyphens=False))
    lines.append(f"  {' '.join(by_use['refused'])} and anything else is refused (docs/options.md says what "
                 "each option does).")
    lines.append("  Unmount: umount MNT, fusermount3 -u MNT or pyunionfs umount MNT")
    return "\n".join(lines)


# -- running ---------------------------------------------------------------------


def run(argv: list[str]) -> int:
    """Mount as fuse-overlayfs would; return the exit status (UsageError and
    MountError propagate to the caller's one-line reporting)."""
    from ..config import VERSION, build_config

    inv = parse_argv(argv)
    if inv.help:
        print(help_text())
        return 0
    if inv.version:
        print(f"pyunionfs {VERSION}")
        return 0
    assert inv.lowers is not None
    cfg = build_config(inv.lowers, inv.upper, inv.mountpoint, inv.options, inv.foreground, inv.debug,
                       workdir=inv.workdir, fsname=inv.source)
    from ..fuse.mount import mount_configured

    def warn() -> None:
        for w in inv.warnings:
            print(f"pyunionfs: warning: {w}", file=sys.stderr)

    if cfg.foreground:
        warn()
        return mount_configured(cfg, inv.log)
    status = mount_configured(cfg, inv.log)
    if status == 0:  # after the fact, so that a failed mount still says one line
        warn()
    return status


# -- making the command findable for mount.fuse3 --------------------------------


def own_command() -> str:
    """The absolute path of this installation's ``pyunionfs`` command."""
    here = sys.argv[0] if sys.argv else ""
    if os.path.basename(here) == "pyunionfs" and os.path.isfile(here):
        return os.path.abspath(here)
    beside = os.path.join(os.path.dirname(sys.executable), "pyunionfs")
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return beside
    raise UsageError(f"cannot find the pyunionfs command beside {sys.executable}: install the package (pip install .)")


def install_helper(directory: str = HELPER_DIR, remove: bool = False) -> str:
    """Link DIR/pyunionfs to this installation's command (or remove that link);
    return what was done, in one line."""
    link = os.path.join(directory, "pyunionfs")
    if remove:
        if not os.path.lexists(link):
            return f"{link} does not exist: nothing to remove"
        if not os.path.islink(link):
            raise UsageError(f"{link} is not a symbolic link: not removing it")
        os.unlink(link)
        return f"removed {link}"
    target = own_command()
    if os.path.islink(link) and os.readlink(link) == target:
        return f"{link} -> {target} (already there)"
    if os.path.lexists(link):
        raise UsageError(f"{link} exists and is not a link to {target}: remove it first (--remove)")
    if not os.path.isdir(directory):
        raise UsageError(f"{directory} is not a directory")
    try:
        os.symlink(target, link)
    except OSError as exc:
        raise UsageError(f"cannot create {link}: {exc.strerror}") from None
    return f"{link} -> {target}"

