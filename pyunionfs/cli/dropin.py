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
libfuse or mount(8) may hand over is in :data:`OPTIONS`, with what pyunionfs
does with it; anything else is refused, as ``pyunionfs mount`` refuses it.
"""

from __future__ import annotations

import difflib
import os
import sys
import textwrap
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import NamedTuple

from ..config import split_items, unescape
from ..errors import UsageError

#: Where ``install-helper`` links the command by default: the first directory
#: of the search path mount.fuse3's /bin/sh falls back to (mount(8) runs its
#: helpers without PATH) and of systemd's PATH for fstab mounts.
HELPER_DIR = "/usr/local/sbin"


class Option(NamedTuple):
    """One ``-o`` option of the drop-in form."""

    spelling: str  #: as documented; a ``=`` means the option takes a value, a ``*`` ends a prefix
    origin: str  #: who defines it
    use: str  #: "honoured", "ignored", or "ignored, with a warning"
    note: str  #: what pyunionfs does with it

    @property
    def key(self) -> str:
        return self.spelling.split("=")[0].rstrip("*")

    @property
    def takes_value(self) -> bool:
        return "=" in self.spelling


_H, _I, _W, _R = "honoured", "ignored", "ignored, with a warning", "refused"
_OVL, _FOVL, _FUSE, _MOUNT = "overlayfs", "fuse-overlayfs", "libfuse", "mount(8)"

OPTIONS: tuple[Option, ...] = (
    # the layers
    Option("lowerdir=DIR[:DIR...]", f"{_OVL}, {_FOVL}", _H,
           "the lower layers, topmost first; `\\:` and `\\\\` escape; relative to the current directory"),
    Option("upperdir=DIR", f"{_OVL}, {_FOVL}", _H, "the upper layer; without it the mount is read-only"),
    Option("workdir=DIR", f"{_OVL}, {_FOVL}", _H,
           "the work directory (same layout as the kernel's); default `.UPPER.pyunionfs-work` beside the upper; "
           "unused without upperdir"),
    # what pyunionfs mount -o also takes
    Option("ro", _MOUNT, _H, "read-only mount (with an upperdir, the upper is read as the top layer)"),
    Option("rw", _MOUNT, _H, "read-write (the default with an upperdir); of ro and rw the last one wins"),
    Option("userxattr", _OVL, _H,
           "markers only as `user.overlay.*`; turned on by itself where `trusted.*` xattrs cannot be written "
           "(rootless)"),
    Option("timeout=SECONDS", _FOVL, _H, "how long the kernel caches names and attributes (default 86400)"),
    Option("oci_whiteouts=on|off", "pyunionfs", _H, "honour OCI `.wh.` files in layers (default on)"),
    Option("engine=native|pyfuse3", "pyunionfs", _H,
           "the FUSE engine: pyunionfs's own (default) or pyfuse3 + trio (needs the `pyfuse3` extra)"),
    Option("passthrough=on|off", "pyunionfs", _H,
           "the kernel reads and writes upper files itself (FUSE passthrough; default on where allowed)"),
    Option("default_permissions", f"{_OVL}, {_FUSE}", _H, "always on: the kernel checks permissions"),
    Option("allow_other", _FUSE, _H, "other users may use the mount (always on as root)"),
    Option("debug", _FUSE, _H, "log every request (to the `--log` file, or stderr with `-f`)"),
    Option("dev", _MOUNT, _H, "device files work in the mount (FUSE's default is `nodev`); needs root"),
    Option("nodev", _MOUNT, _H, "device files do not work (the default)"),
    Option("suid", _MOUNT, _H, "set-user-ID bits work (FUSE's default is `nosuid`); needs root"),
    Option("nosuid", _MOUNT, _H, "set-user-ID bits are ignored (the default)"),
    Option("exec", _MOUNT, _H, "programs may run from the mount (the default)"),
    Option("noexec", _MOUNT, _H, "programs may not run from the mount"),
    Option("sync", _MOUNT, _H, "every write is also fsync'ed to the upper"),
    Option("async", _MOUNT, _H, "the default: writes reach the upper's page cache"),
    Option("noatime", _MOUNT, _H, "passed on to the kernel"),
    Option("atime", _MOUNT, _H, "passed on to the kernel (the default)"),
    # fuse-overlayfs's own
    Option("volatile", f"{_OVL}, {_FOVL}", _I,
           "the mount stays durable: copy-ups and fsync still reach the disk (no `work/incompat/volatile` "
           "marker is made, so the kernel can mount the same upper later)"),
    Option("fsync=0|1", _FOVL, _I, "fsync(2) through the mount always reaches the upper"),
    Option("uidmapping=MAP", _FOVL, _W, "owners are shown as stored: no ID shifting"),
    Option("gidmapping=MAP", _FOVL, _W, "groups are shown as stored: no ID shifting"),
    Option("squash_to_root", _FOVL, _W, "owners are shown as stored"),
    Option("squash_to_uid=UID", _FOVL, _W, "owners are shown as stored"),
    Option("squash_to_gid=GID", _FOVL, _W, "groups are shown as stored"),
    Option("static_nlink", _FOVL, _I,
           "merged directories always report st_nlink 1, the others their real count"),
    Option("noacl", _FOVL, _H, "the kernel checks mode bits only, not POSIX ACLs; ACL xattrs are kept"),
    Option("fast_ino=0|1", _FOVL, _I, "inode numbers are always overlayfs's xino scheme"),
    Option("writeback=0|1", _FOVL, _I, "the kernel's page cache is used as pyunionfs always does"),
    Option("noxattrs=0|1", _FOVL, _I, "xattrs always work"),
    Option("threaded=0|1", _FOVL, _I, "the native engine always serves from several threads"),
    Option("plugins=LIST", _FOVL, _W, "no layer plugins"),
    Option("xattr_permissions=0|1|2", _FOVL, _W, "modes and owners are shown as stored, not from an xattr"),
    Option("context=LABEL", f"{_FOVL}, {_FUSE}", _W, "no SELinux label is set on the mount"),
    # the kernel's overlayfs
    Option("redirect_dir=on|off|follow|nofollow", _OVL, _I,
           "pyunionfs works as `off`: renaming a directory with lower parts gives EXDEV (`mv` then copies)"),
    Option("metacopy=on|off", _OVL, _I, "pyunionfs works as `off`: copy-up always copies the data"),
    Option("index=on|off", _OVL, _I, "hard-linked lower files are copied up through `index/` as with `on`"),
    Option("xino=on|off|auto", _OVL, _I, "inode numbers are always xino-style"),
    Option("nfs_export=on|off", _OVL, _I, "not exportable over NFS"),
    Option("uuid=on|off|null|auto", _OVL, _I, "origin records carry a null uuid (the kernel's `auto` on a new upper)"),
    # libfuse's
    Option("allow_root", _FUSE, _I, "as root every user has access anyway; unprivileged, only the owner"),
    Option("auto_unmount", _FUSE, _I, "the daemon unmounts itself on SIGTERM, SIGINT, SIGHUP"),
    Option("kernel_cache", _FUSE, _I, "file data is always cached by the kernel"),
    Option("max_read=N", _FUSE, _I, ""),
    Option("max_write=N", _FUSE, _I, ""),
    Option("splice_read", _FUSE, _I, ""),
    Option("splice_write", _FUSE, _I, ""),
    Option("splice_move", _FUSE, _I, ""),
    Option("clone_fd", _FUSE, _I, ""),
    Option("max_idle_threads=N", _FUSE, _I, ""),
    Option("max_threads=N", _FUSE, _I, ""),
    Option("fsname=NAME", _FUSE, _H,
           "the mount's source (`findmnt -S NAME`, `df`); default SOURCE if given, else `pyunionfs`"),
    Option("subtype=TYPE", _FUSE, _I, "the type is always `fuse.pyunionfs`"),
    # mount(8), fstab
    Option("diratime", _MOUNT, _I, ""),
    Option("nodiratime", _MOUNT, _I, ""),
    Option("relatime", _MOUNT, _I, ""),
    Option("norelatime", _MOUNT, _I, ""),
    Option("strictatime", _MOUNT, _I, ""),
    Option("nostrictatime", _MOUNT, _I, ""),
    Option("lazytime", _MOUNT, _I, ""),
    Option("nolazytime", _MOUNT, _I, ""),
    Option("dirsync", _MOUNT, _I, ""),
    Option("defaults", _MOUNT, _I, "(mount(8) and mount.fuse3 normally keep these to themselves)"),
    Option("remount", _MOUNT, _R, "refused in one line: unmount, then mount again with the new options"),
    Option("auto", _MOUNT, _I, ""),
    Option("noauto", _MOUNT, _I, ""),
    Option("user", _MOUNT, _I, ""),
    Option("nouser", _MOUNT, _I, ""),
    Option("users", _MOUNT, _I, ""),
    Option("owner", _MOUNT, _I, ""),
    Option("group", _MOUNT, _I, ""),
    Option("_netdev", _MOUNT, _I, ""),
    Option("nofail", _MOUNT, _I, ""),
    Option("comment=TEXT", _MOUNT, _I, ""),
    Option("x-*", _MOUNT, _I, "any option starting with `x-` or `X-` (systemd's `x-systemd.*` too)"),
)

_BY_KEY = {o.key: o for o in OPTIONS if not o.spelling.endswith("*")}
_PREFIXES = tuple(o.key for o in OPTIONS if o.spelling.endswith("*"))


def lookup(key: str) -> Option | None:
    """The table row of option *key*, or None if pyunionfs does not take it."""
    if key in _BY_KEY:
        return _BY_KEY[key]
    for prefix in _PREFIXES:
        if key.lower().startswith(prefix.lower()):
            return next(o for o in OPTIONS if o.key == prefix)
    return None


# -- reading the command line ---------------------------------------------------


@dataclass
class Invocation:
    """What a drop-in command line asks for, ready for build_config."""

    mountpoint: str = ""
    source: str | None = None  #: the SOURCE before MNT (mount.fuse3): the mount's source
    lowers: str | None = None
    upper: str = ""
    workdir: str | None = None
    options: list[str] = field(default_factory=list)  #: for build_config (KNOWN_OPTIONS only)
    warnings: list[str] = field(default_factory=list)
    foreground: bool = False
    debug: bool = False
    log: str | None = None
    help: bool = False
    version: bool = False


def is_overlay_form(argv: list[str], subcommands: Collection[str]) -> bool:
    """Whether *argv* is the fuse-overlayfs / mount.fuse3 form, not a subcommand.

    That form starts with an option (``-o``, ``-f``...) or with mount.fuse3's
    SOURCE; a subcommand's name wins, unless the line has a ``lowerdir=``
    (``mount -t fuse.pyunionfs mount MNT -o lowerdir=...``: a SOURCE that
    happens to be a subcommand's name).  A first word that is neither, with
    no ``lowerdir=``, is the drop-in form only if it has ``-o`` options and
    does not look like a mistyped subcommand (``mout L U M``, ``umonut M``),
    which argparse then refuses with the name meant.
    """
    if not argv or argv[0] in ("-h", "--help", "--version"):
        return False
    names = sorted(subcommands)  # the parser's own list: a new subcommand is known here at once
    groups = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-o"]
    groups += [a[2:] for a in argv if a.startswith("-o") and len(a) > 2]
    has_lowerdir = any(item.startswith("lowerdir=") for g in groups for item in split_items(g))
    if argv[0] in names:
        return argv[0] != "commit" and has_lowerdir  # commit's -o names the output file
    if argv[0].startswith("-") or has_lowerdir:
        return True
    return bool(groups) and not difflib.get_close_matches(argv[0], names, n=1)


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
    readonly = False
    passed: list[str] = []
    for item in items:
        key, eq, value = item.partition("=")
        opt = lookup(key)
        if opt is None:
            raise UsageError(f"unknown option {key!r} (the README's drop-in table lists what pyunionfs takes)")
        if opt.use == _R:
            raise UsageError(f"remount is not supported: unmount {inv.mountpoint} and mount it again with the "
                             "new options")
        if opt.use == _H and opt.takes_value != bool(eq):
            # (ignored ones are not checked: fuse-overlayfs takes max_write bare, libfuse max_write=N)
            raise UsageError(f"option {key!r} needs a value ({opt.spelling})" if opt.takes_value
                             else f"option {key!r} takes no value")
        if key == "lowerdir":
            inv.lowers = value  # escapes left for split_layers
        elif key == "upperdir":
            if not value:
                raise UsageError("empty upperdir= (leave it out for a read-only mount)")
            inv.upper = unescape(value)
        elif key == "workdir":
            inv.workdir = unescape(value) or None
        elif key in ("ro", "rw"):
            readonly = key == "ro"  # the last one wins, as for mount(8)
        elif opt.use == _H:
            passed.append(item)
        elif opt.use == _W and not (key == "xattr_permissions" and value == "0"):
            inv.warnings.append(f"{key}= ignored: {opt.note}" if opt.takes_value else f"{key} ignored: {opt.note}")
    if readonly:
        passed.append("ro")
    inv.options = passed
    inv.warnings = list(dict.fromkeys(inv.warnings))


# -- help ------------------------------------------------------------------------


USAGE = "pyunionfs [-f] [-d] [--log FILE] -o lowerdir=L1:L2,upperdir=U,workdir=W[,OPT...] [SOURCE] MNT"


def help_text() -> str:
    """The drop-in form's usage and option names (details: README, "Drop-in for container tools")."""
    by_use: dict[str, list[str]] = {}
    for o in OPTIONS:
        by_use.setdefault(o.use.split(",")[0], []).append(o.spelling)
    lines = [
        "the fuse-overlayfs and mount.fuse3 form:",
        f"  {USAGE}",
        "  (-o may repeat and may come after MNT; SOURCE is the mount's source unless fsname= is given.",
        "  Returns once the mount is live.)",
    ]
    for use in ("honoured", "ignored"):
        lines.append(textwrap.fill(" ".join(by_use[use]), 100, initial_indent=f"  {use} options: ",
                                   subsequent_indent="    ", break_on_hyphens=False))
    lines.append("  remount and anything else is refused.  Unmount: umount MNT, fusermount3 -u MNT or "
                 "pyunionfs umount MNT")
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

