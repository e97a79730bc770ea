"""Every ``-o`` option pyunionfs knows, in one table, and the ``-o`` syntax.

:data:`TABLE` is the only place an option is described.  Everything that
needs the option set reads it: :func:`pyunionfs.config.build_config`
validates ``pyunionfs mount -o`` against it, :mod:`pyunionfs.cli.dropin`
decides from it what the fuse-overlayfs and mount.fuse3 forms do with each
option, ``pyunionfs mount --help`` and the drop-in help list it, and
docs/options.md is its rendering (:func:`markdown`; a test compares, and
``python -m pyunionfs.options > docs/options.md`` regenerates it).  A new
option is one row here, plus whatever honours it.

The drop-in forms take every option fuse-overlayfs, the kernel's overlayfs,
libfuse or mount(8) may hand over, since a container tool or an fstab line
cannot be told to leave one out: each such row says whether pyunionfs
honours it, ignores it (silently, or with a warning where the mount will
not show what was asked for) or refuses it.
"""

from __future__ import annotations

import enum
import math
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .errors import UsageError

#: Seconds the kernel may cache names and attributes (``-o timeout=``).
DEFAULT_TIMEOUT = 86400.0

#: The mount's source in the mount table unless ``-o fsname=`` says otherwise.
DEFAULT_FSNAME = "pyunionfs"

#: The FUSE engines a mount can be served by (``-o engine=``).
ENGINES = ("native", "pyfuse3")

#: The longest ``fsname=`` taken, in bytes (the kernel takes a page; a table row wants less).
MAX_FSNAME = 1024


class Form(enum.Enum):
    """A command line that takes ``-o`` options."""

    MOUNT = "pyunionfs mount -o"
    OVERLAY = "the fuse-overlayfs form"  #: ``pyunionfs -o lowerdir=... MNT`` (containers/storage)
    FUSE3 = "the mount.fuse3 form"  #: ``pyunionfs SOURCE MNT -o ...`` (mount -t fuse.pyunionfs, fstab)

    @property
    def hint(self) -> str:
        """Where a user of this form finds the option list (for "unknown option")."""
        return "see pyunionfs mount --help" if self is Form.MOUNT else "pyunionfs --help lists them"


class Kind(enum.Enum):
    """What an option's value is, and so how it is checked."""

    FLAG = "flag"  #: no value
    INT = "int"  #: a whole number in [low, high]
    NUMBER = "number"  #: a real number, finite, at least low
    CHOICE = "choice"  #: one of the choices
    PATH = "path"  #: a path (empty: the default)
    PATHS = "paths"  #: a ``:`` separated list of paths, ``\\`` escaping
    TEXT = "text"  #: free text, checked by the row's own function if it has one


class Use(enum.Enum):
    """What pyunionfs does with an option it is given."""

    HONOURED = "honoured"
    IGNORED = "ignored"
    WARNED = "ignored, with a warning"  #: the mount will not show what the option asks for
    REFUSED = "refused"


#: Both forms of the drop-in command line: one parser reads them, so they take the same options.
DROPIN = frozenset({Form.OVERLAY, Form.FUSE3})
#: Every form.
ALL = frozenset(Form)

_OVL, _FOVL, _FUSE, _MOUNT, _OURS = "overlayfs", "fuse-overlayfs", "libfuse", "mount(8)", "pyunionfs"


def id_ranges(text: str, name: str = "uidmapping") -> tuple[tuple[int, int, int], ...]:
    """The (stored, shown, count) ranges of a fuse-overlayfs ``uidmapping=``/``gidmapping=``
    value (``STORED:SHOWN:COUNT``, colon-separated triples); one-line UsageError if malformed.

    Empty items are skipped, as fuse-overlayfs's strtok() does: containers/storage
    writes ``uidmapping=:0:1000:2000`` (a colon before every triple).  A value with
    no triple at all is refused (fuse-overlayfs would map nothing)."""
    parts = [p for p in text.split(":") if p]
    if not parts or len(parts) % 3 or not all(p.isdigit() for p in parts):
        raise UsageError(f"{name} must be STORED:SHOWN:COUNT triples of whole numbers joined by ':', not {text!r}")
    ranges = tuple((int(parts[i]), int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts), 3))
    if any(n == 0 or a + n > 1 << 32 or b + n > 1 << 32 for a, b, n in ranges):
        raise UsageError(f"{name}: every range needs a count of at least 1 and must end below 2^32, not {text!r}")
    return ranges


def check_fsname(name: str) -> str:
    """*name* if it can be a mount's source: not empty, no control characters
    (the mount table escapes blanks, commas travel escaped), at most
    :data:`MAX_FSNAME` bytes."""
    if not name:
        raise UsageError("empty fsname= (leave it out for the default, pyunionfs)")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise UsageError(f"fsname {name!r} holds a control character")
    if len(os.fsencode(name)) > MAX_FSNAME:
        raise UsageError(f"fsname is longer than {MAX_FSNAME} bytes")
    return name


@dataclass(frozen=True, slots=True)
class Option:
    """One row of the table: an option, its value, what it does, and who takes it."""

    name: str  #: the key (before ``=``); with :attr:`prefix`, the start of every key it covers
    origin: str  #: who defines it (overlayfs, fuse-overlayfs, libfuse, mount(8), pyunionfs)
    help: str  #: one line: what it means, or (not honoured) what pyunionfs does instead; markdown
    kind: Kind = Kind.FLAG
    metavar: str = ""  #: the value's placeholder in the spelling (CHOICE shows its choices instead)
    choices: tuple[str, ...] = ()
    low: float | None = None  #: INT, NUMBER: the least value taken
    high: float | None = None  #: INT, NUMBER: the greatest value taken
    default: str | None = None  #: the value taken when the option is not given, as it would be written
    forms: frozenset[Form] = ALL
    use: Use = Use.HONOURED
    opposite: str | None = None  #: a kernel mount flag: the flag it undoes (of the two the last one given wins)
    check: Callable[[str], object] | None = None  #: TEXT: raises UsageError for a value not taken
    quiet: tuple[str, ...] = ()  #: WARNED: values that ask for nothing pyunionfs lacks, so draw no warning
    prefix: bool = False  #: covers every key starting with :attr:`name`, in any case

    @property
    def key(self) -> str:
        return self.name

    @property
    def takes_value(self) -> bool:
        return self.kind is not Kind.FLAG

    @property
    def spelling(self) -> str:
        """As documented: ``timeout=SECONDS``, ``engine=native|pyfuse3``, ``x-*``."""
        if self.prefix:
            return self.name + "*"
        if self.kind is Kind.FLAG:
            return self.name
        return f"{self.name}={'|'.join(self.choices) if self.choices else self.metavar}"

    def validate(self, value: str | None) -> None:
        """Raise UsageError, in one line naming the option, unless *value* (None:
        given without ``=``; escapes already removed) is one this option takes.

        Only honoured options are checked: an ignored one's value means
        nothing to pyunionfs, and callers spell some of them differently
        (fuse-overlayfs takes ``max_write`` bare, libfuse ``max_write=N``).
        """
        if self.use is not Use.HONOURED:
            return
        if self.kind is Kind.FLAG:
            if value is not None:
                raise UsageError(f"option {self.name!r} takes no value")
            return
        if value is None:
            raise UsageError(f"option {self.name!r} needs a value ({self.spelling})")
        if self.kind is Kind.NUMBER:
            unit = f" of {self.metavar.lower()}" if self.metavar else ""
            try:
                number = float(value)
            except ValueError:
                raise UsageError(f"{self.name} must be a number{unit}, not {value!r}") from None
            if not math.isfinite(number) or not self._in_range(number):
                least = "a non-negative" if self.low == 0 else "a"
                raise UsageError(f"{self.name} must be {least} number{unit}{self._range()}, not {value!r}")
        elif self.kind is Kind.INT:
            if not value.isdigit() or not self._in_range(int(value)):
                what = "a positive whole number" if (self.low, self.high) == (1, None) else "a whole number"
                raise UsageError(f"{self.name} must be {what}{self._range(1)}, not {value!r}")
        elif self.kind is Kind.CHOICE and value not in self.choices:
            raise UsageError(f"{self.name} must be {_either(self.choices)}, not {value!r}")
        elif self.kind is Kind.TEXT and self.check is not None:
            self.check(value)

    def _in_range(self, number: float) -> bool:
        return (self.low is None or number >= self.low) and (self.high is None or number <= self.high)

    def _range(self, implied_low: float = 0) -> str:
        """" from 1 to 9" where the bounds are not already said by "non-negative"/"positive"."""
        if self.high is None:
            return ""
        return f" from {self.low if self.low is not None else implied_low:g} to {self.high:g}"

    def describe(self) -> str:
        """The help line with its default, as --help and docs/options.md show it (markdown)."""
        default = f" (default {self.default})" if self.default is not None and self.use is Use.HONOURED else ""
        quiet = f" (no warning for {' or '.join(self.quiet)})" if self.quiet else ""
        return self.help + default + quiet


def _either(choices: tuple[str, ...]) -> str:
    return " or ".join(choices) if len(choices) == 2 else "one of " + ", ".join(choices)


def _ignored(name: str, origin: str, help: str = "", *, kind: Kind = Kind.FLAG, metavar: str = "",
             choices: tuple[str, ...] = (), use: Use = Use.IGNORED, quiet: tuple[str, ...] = (),
             prefix: bool = False) -> Option:
    """A row only the drop-in forms take, and do nothing with (*use* may say: with a warning)."""
    return Option(name, origin, help, kind=kind, metavar=metavar, choices=choices, forms=DROPIN, use=use,
                  quiet=quiet, prefix=prefix)


def _flag_pair(on: str, off: str, on_help: str, off_help: str) -> tuple[Option, Option]:
    """Two kernel mount flags that undo each other (``dev``/``nodev``...)."""
    return (Option(on, _MOUNT, on_help, opposite=off), Option(off, _MOUNT, off_help, opposite=on))


_KEPT = "mount(8) and mount.fuse3 normally keep it to themselves"
_V = Kind.CHOICE
_ONOFF = ("on", "off")
_01 = ("0", "1")

TABLE: tuple[Option, ...] = (
    # -- the layers ---------------------------------------------------------------
    Option("lowerdir", f"{_OVL}, {_FOVL}", "the lower layers, topmost first; `\\:` and `\\\\` escape; relative to "
           "the current directory", kind=Kind.PATHS, metavar="DIR[:DIR...]", forms=DROPIN),
    Option("upperdir", f"{_OVL}, {_FOVL}", "the upper layer; without it the mount is read-only",
           kind=Kind.PATH, metavar="DIR", forms=DROPIN),
    Option("workdir", f"{_OVL}, {_FOVL}", "the work directory for atomic copy-up (the kernel's layout), on the "
           "upper's filesystem and outside the layers (default `.UPPER.pyunionfs-work` beside the upper); unused "
           "without an upper", kind=Kind.PATH, metavar="DIR"),
    # -- what the mount is --------------------------------------------------------
    Option("ro", _MOUNT, "read-only mount: every write fails with EROFS (implied without an upper; with one, the "
           "upper is read as the top layer)"),
    Option("rw", _MOUNT, "read-write mount (the default with an upper); in the drop-in forms, of `ro` and `rw` the "
           "last one wins"),
    Option("userxattr", _OVL, "markers only as `user.overlay.*` xattrs, as overlayfs `-o userxattr`; on by itself "
           "where `trusted.*` xattrs cannot be written (rootless)"),
    Option("timeout", _FOVL, "how long the kernel may cache names and attributes", kind=Kind.NUMBER,
           metavar="SECONDS", low=0, default=f"{DEFAULT_TIMEOUT:g}"),
    Option("oci_whiteouts", _OURS, "honour OCI `.wh.` whiteout files in layers", kind=_V, choices=_ONOFF,
           default="on"),
    Option("engine", _OURS, "the FUSE engine: pyunionfs's own, or pyfuse3 + trio (the `pyfuse3` extra)",
           kind=_V, choices=ENGINES, default=ENGINES[0]),
    Option("passthrough", _OURS, "let the kernel read and write upper files itself (FUSE passthrough, where the "
           "kernel allows it); `all`: lower files of 64 KiB or more opened to read too, where a descriptor opened "
           "before a copy-up keeps reading the lower file (docs/semantics.md); a read-only mount does that with "
           "`on`, as nothing is copied up there", kind=_V,
           choices=("on", "off", "all"), default="on"),
    Option("uring", _OURS, "take requests over io_uring, each on the CPU of its caller, where the kernel offers "
           "it (Linux 6.14 or newer with the `fuse` module's `enable_uring` set: docs/speed.md); `off`: read them "
           "from /dev/fuse only", kind=_V, choices=_ONOFF, default="on"),
    Option("max_files_per_uid", _OURS, "open files and directories one user other than root may hold (default: a "
           "quarter of what the daemon's open-file limit leaves for them)", kind=Kind.INT, metavar="N", low=1),
    Option("noacl", _FOVL, "the kernel checks mode bits only, not POSIX ACLs (ACL xattrs are still kept)"),
    Option("default_permissions", f"{_OVL}, {_FUSE}", "the kernel checks permissions (always on)"),
    Option("allow_other", _FUSE, "other users may use the mount (always on as root)"),
    Option("debug", _FUSE, "log every request (to the `--log` file, or stderr in the foreground); unlike "
           "`--debug`, it does not imply `-f`"),
    Option("fsname", _FUSE, "the mount's source, as `findmnt -S NAME` and `df` show it (in the mount.fuse3 form "
           "SOURCE, unless this is given); `\\,` escapes a comma, control characters are refused",
           kind=Kind.TEXT, metavar="NAME", check=check_fsname, default=DEFAULT_FSNAME),
    # -- kernel mount flags: of each pair the last one given wins ---------------------
    *_flag_pair("dev", "nodev", "device files work in the mount (FUSE's default is `nodev`; root only)",
                "device files do not work in the mount (the default)"),
    *_flag_pair("suid", "nosuid", "set-user-ID and set-group-ID bits work (FUSE's default is `nosuid`; "
                "root only)", "set-user-ID and set-group-ID bits are ignored (the default)"),
    *_flag_pair("exec", "noexec", "programs may run from the mount (the default)",
                "programs may not run from the mount"),
    *_flag_pair("async", "sync", "writes reach the upper's page cache (the default)",
                "synchronous writes: each write is also fsync'ed to the upper file"),
    *_flag_pair("atime", "noatime", "the kernel updates access times (the default)",
                "the kernel does not update access times"),
    # -- fuse-overlayfs's own -----------------------------------------------------------
    _ignored("volatile", f"{_OVL}, {_FOVL}", "the mount stays durable: copy-ups and fsync still reach the disk "
             "(no `work/incompat/volatile` marker is made, so the kernel can mount the same upper later)"),
    _ignored("fsync", _FOVL, "fsync(2) through the mount always reaches the upper (containers/storage passes "
             "`fsync=0`)", kind=_V, choices=_01),
    Option("uidmapping", _FOVL, "owners shown other than stored: `STORED:SHOWN:COUNT` ranges joined by `:`, as "
           "fuse-overlayfs (an owner outside them shows as 65534); chown and new files store through them",
           kind=Kind.TEXT, metavar="MAP", check=lambda v: id_ranges(v, "uidmapping")),
    Option("gidmapping", _FOVL, "groups shown other than stored, as `uidmapping=`", kind=Kind.TEXT, metavar="MAP",
           check=lambda v: id_ranges(v, "gidmapping")),
    Option("squash_to_root", _FOVL, "every owner and group shows as 0 (what is stored is unchanged; a failing chown "
           "is not reported)"),
    Option("squash_to_uid", _FOVL, "every owner shows as UID (as `squash_to_root`)", kind=Kind.INT, metavar="UID",
           low=0, high=(1 << 32) - 2),
    Option("squash_to_gid", _FOVL, "every group shows as GID (as `squash_to_root`)", kind=Kind.INT, metavar="GID",
           low=0, high=(1 << 32) - 2),
    _ignored("static_nlink", _FOVL, "merged directories always report st_nlink 1, the others their real count"),
    _ignored("fast_ino", _FOVL, "inode numbers always follow overlayfs's xino scheme", kind=_V, choices=_01),
    _ignored("writeback", _FOVL, "the kernel's page cache is used as pyunionfs always does", kind=_V,
             choices=_01),
    _ignored("noxattrs", _FOVL, "xattrs always work", kind=_V, choices=_01),
    _ignored("threaded", _FOVL, "the native engine always serves from several threads", kind=_V, choices=_01),
    _ignored("plugins", _FOVL, "no layer plugins", kind=Kind.TEXT, metavar="LIST", use=Use.WARNED),
    Option("xattr_permissions", _FOVL, "`1` or `2`: owners and modes in the upper are kept in a "
           "`security.` (`1`) or `user.` (`2`) `fuseoverlayfs.override_stat` record instead of chown/chmod, as "
           "fuse-overlayfs; lowers whose root has such a record (or `user.containers.override_stat`) are shown "
           "from theirs whatever the value", kind=_V, choices=("0", "1", "2"), default="0"),
    _ignored("context", f"{_FOVL}, {_FUSE}", "no SELinux label is set on the mount", kind=Kind.TEXT,
             metavar="LABEL", use=Use.WARNED),
    # -- the kernel's overlayfs -------------------------------------------------------
    Option("redirect_dir", _OVL, "`on`: a directory with lower parts can be renamed (an `overlay.redirect` "
           "record says where its lower parts are); `follow` and `off`: such records in the layers are followed, "
           "none is written, and renaming such a directory gives EXDEV (`mv` then copies); `nofollow`: a lookup "
           "that meets one gives EPERM. As the kernel's modes; `follow` is the kernel's default here, and keeps "
           "the upper readable without its lowers (`commit`)", kind=_V, choices=("on", "follow", "off", "nofollow"),
           default="follow"),
    Option("metacopy", _OVL, "`on`: changing a lower file's owner, mode, times or xattrs (and renaming or "
           "linking it) copies up only its metadata, with an `overlay.metacopy` record; the data follows at the first "
           "write or truncate, and reads go to the lower file until then. Such copies in the layers are followed; "
           "with `off` a lookup that meets one gives EPERM, as the kernel's. `on` implies `redirect_dir=on`",
           kind=_V, choices=_ONOFF, default="off"),
    _ignored("index", _OVL, "hard-linked lower files are copied up through `index/` as with `on`", kind=_V,
             choices=_ONOFF),
    _ignored("xino", _OVL, "inode numbers are always xino-style", kind=_V, choices=("on", "off", "auto")),
    _ignored("nfs_export", _OVL, "not exportable over NFS", kind=_V, choices=_ONOFF),
    _ignored("uuid", _OVL, "origin records carry a null uuid (the kernel's `auto` on a new upper)", kind=_V,
             choices=("on", "off", "null", "auto")),
    # -- libfuse's ----------------------------------------------------------------------
    _ignored("allow_root", _FUSE, "as root every user has access anyway; unprivileged, only the owner"),
    _ignored("auto_unmount", _FUSE, "the daemon unmounts itself on SIGTERM, SIGINT and SIGHUP"),
    _ignored("kernel_cache", _FUSE, "file data is always cached by the kernel"),
    _ignored("max_read", _FUSE, kind=Kind.INT, metavar="N"),
    _ignored("max_write", _FUSE, kind=Kind.INT, metavar="N"),
    _ignored("splice_read", _FUSE),
    _ignored("splice_write", _FUSE),
    _ignored("splice_move", _FUSE),
    _ignored("clone_fd", _FUSE),
    _ignored("max_idle_threads", _FUSE, kind=Kind.INT, metavar="N"),
    _ignored("max_threads", _FUSE, kind=Kind.INT, metavar="N"),
    _ignored("subtype", _FUSE, "the type is always `fuse.pyunionfs`", kind=Kind.TEXT, metavar="TYPE"),
    # -- mount(8), fstab ------------------------------------------------------------------
    *(_ignored(n, _MOUNT) for n in ("diratime", "nodiratime", "relatime", "norelatime", "strictatime",
                                    "nostrictatime", "lazytime", "nolazytime", "dirsync")),
    *(_ignored(n, _MOUNT, _KEPT) for n in ("defaults", "auto", "noauto", "user", "nouser", "users", "owner",
                                             "group", "_netdev", "nofail")),
    _ignored("comment", _MOUNT, _KEPT, kind=Kind.TEXT, metavar="TEXT"),
    _ignored("x-", _MOUNT, "any option starting with `x-` or `X-` (systemd's `x-systemd.*` too); " + _KEPT,
             prefix=True),
    Option("remount", _MOUNT, "unmount {mountpoint} and mount it again with the new options", use=Use.REFUSED),
)

_BY_NAME = {o.name: o for o in TABLE}
_PREFIXED = tuple(o for o in TABLE if o.prefix)


def lookup(key: str) -> Option | None:
    """The table row of option *key*, or None if pyunionfs does not know it."""
    row = _BY_NAME.get(key)
    if row is not None:
        return row
    return next((o for o in _PREFIXED if key.lower().startswith(o.name.lower())), None)


def option(name: str) -> Option:
    """The row named *name* (a KeyError is a bug: the name is spelled in code)."""
    return _BY_NAME[name]


def taken_by(form: Form) -> tuple[Option, ...]:
    """The rows *form* accepts, in table order (refused ones included: they are known, and refused by name)."""
    return tuple(o for o in TABLE if form in o.forms)


def mount_flag_pairs() -> tuple[tuple[str, str], ...]:
    """The kernel mount flags, in pairs that undo each other, in table order."""
    pairs: list[tuple[str, str]] = []
    for o in TABLE:
        if o.opposite is not None and all(o.name not in pair for pair in pairs):
            pairs.append((o.name, o.opposite))
    return tuple(pairs)


def unknown(key: str, form: Form) -> UsageError:
    """The one-line refusal of *key*, naming the closest option *form* takes, if one is close."""
    names = [o.name for o in taken_by(form) if not o.prefix]
    import difflib  # only for a typo: not paid by every mount

    close = difflib.get_close_matches(key, names, n=1)
    return UsageError(f"unknown option {key!r} (did you mean {close[0]!r}?)" if close
                      else f"unknown option {key!r} ({form.hint})")


# -- the -o syntax -----------------------------------------------------------------


def split_items(group: str) -> list[str]:
    r"""Split one ``-o`` argument at its commas, keeping empty items out.

    As the kernel's overlayfs: a backslash escapes the next character (so
    ``\,`` is a comma inside a value; the escapes are kept for the value's own
    reader), and, as SELinux's ``context="a,b"``, commas inside double quotes
    do not split.
    """
    items: list[str] = []
    cur: list[str] = []
    quoted = False
    i = 0
    while i < len(group):
        ch = group[i]
        if ch == "\\" and i + 1 < len(group):
            cur.append(group[i : i + 2])
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    items.append("".join(cur))
    return [it for it in items if it]


def unescape(value: str) -> str:
    r"""Drop the backslash of every ``\X`` (the kernel's rule for upperdir= and workdir=)."""
    out: list[str] = []
    it = iter(value)
    for ch in it:
        out.append(next(it, "\\") if ch == "\\" else ch)
    return "".join(out)


@dataclass(frozen=True, slots=True)
class Given:
    """One ``-o`` item, found in the table and checked."""

    row: Option
    key: str  #: as written (differs from ``row.name`` for a prefix row)
    raw: str | None  #: the value with its escapes (``lowerdir=`` keeps them for split_layers); None: no ``=``
    item: str  #: the whole item, as written

    @property
    def value(self) -> str:
        """The value without escapes ("" when none was given)."""
        return "" if self.raw is None else unescape(self.raw)


def read(groups: Iterable[str], form: Form, mountpoint: str) -> list[Given]:
    """Every item of the ``-o`` *groups*, in order, with its row; raise UsageError
    (one line, naming the option) for one *form* does not take, one it refuses
    (*mountpoint* goes into the reason) and an honoured one's bad value."""
    out: list[Given] = []
    for group in groups:
        for item in split_items(group):
            key, eq, raw = item.partition("=")
            row = lookup(key)
            if row is None or form not in row.forms:
                raise unknown(key, form)
            if row.use is Use.REFUSED:
                raise UsageError(f"{key} is not supported: {row.help.format(mountpoint=mountpoint)}")
            given = Given(row, key, raw if eq else None, item)
            row.validate(None if given.raw is None else given.value)
            out.append(given)
    return out


# -- help and docs -----------------------------------------------------------------


def help_lines(form: Form, width: int = 22) -> list[str]:
    """``  spelling   meaning (default ...)`` for each option *form* honours, as --help shows them."""
    return [f"  {o.spelling:<{width}} {plain(o.describe())}" for o in taken_by(form) if o.use is Use.HONOURED]


def plain(text: str) -> str:
    """Markdown's backquotes dropped, for a terminal."""
    return text.replace("`", "")


_FORM_LABEL = {Form.MOUNT: "mount", Form.OVERLAY: "overlay", Form.FUSE3: "fuse3"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown() -> str:
    """docs/options.md: every option of :data:`TABLE`, and what each form does with it."""
    lines = [
        "# Mount options",
        "",
        "<!-- Generated from pyunionfs/options.py by `python -m pyunionfs.options > docs/options.md`;",
        "     do not edit by hand: tests/unit/test_options.py fails when this file and the table differ. -->",
        "",
        "Options are given as `-o a,b=c` (`-o` may repeat). Three command lines take them, marked in the",
        "*forms* column:",
        "",
        f"- **{_FORM_LABEL[Form.MOUNT]}**: `pyunionfs mount LOWERS UPPER MNT -o ...`;",
        f"- **{_FORM_LABEL[Form.OVERLAY]}**: the fuse-overlayfs form, "
        "`pyunionfs -o lowerdir=L1:L2,upperdir=U,workdir=W MNT`,",
        "  as containers/storage (podman, buildah) runs its `mount_program`;",
        f"- **{_FORM_LABEL[Form.FUSE3]}**: `pyunionfs SOURCE MNT -o ...`, as mount.fuse3 runs it for",
        "  `mount -t fuse.pyunionfs` and fstab lines.",
        "",
        "The last two take every option fuse-overlayfs, the kernel's overlayfs, libfuse and mount(8) may",
        "hand over, and say below what pyunionfs does with each; any option not listed is refused in one",
        "line, naming the closest one. Empty items (`a,,b`) are skipped; as in overlayfs a backslash",
        "escapes a comma in a value (`\\,`) and a colon in `lowerdir=` (`\\:`); a double-quoted",
        '`context="a,b"` is one item. Of each pair of kernel mount flags (`dev`/`nodev`, `suid`/`nosuid`,',
        "`exec`/`noexec`, `async`/`sync`, `atime`/`noatime`) the last one given wins.",
        "",
        "| option | forms | from | pyunionfs | meaning, or what pyunionfs does instead |",
        "| --- | --- | --- | --- | --- |",
    ]
    for o in TABLE:
        forms = ", ".join(label for form, label in _FORM_LABEL.items() if form in o.forms)
        what = o.help.format(mountpoint="MNT") if o.use is Use.REFUSED else o.describe()
        lines.append(f"| `{_cell(o.spelling)}` | {forms} | {o.origin} | {o.use.value} | {_cell(what)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
