"""A mount's settings: parsed once from the command line, validated once, frozen.

Everything downstream (the union core, the FUSE adapter, the daemon) takes a
:class:`MountConfig` and never re-reads ``argv``: a setting is checked here or
nowhere.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

from .errors import UsageError
from .options import (
    DEFAULT_FSNAME,
    DEFAULT_TIMEOUT,
    ENGINES,
    MAX_FSNAME,
    Form,
    check_fsname,
    id_ranges,
    mount_flag_pairs,
    option,
    read,
    split_items,
    unescape,
)

__all__ = [
    "DEFAULT_FSNAME", "DEFAULT_TIMEOUT", "ENGINES", "MAX_FSNAME", "MOUNT_FLAG_PAIRS", "VERSION", "MountConfig",
    "build_config", "check_fsname", "default_workdir", "mount_flags", "parse_options", "split_items",
    "split_layers", "trusted_xattrs_usable", "unescape",
]

#: The release (``pyunionfs --version``; pyproject.toml's version must match, a test checks).
VERSION = "0.1.0"

#: The kernel mount flags, in pairs that undo each other; of each pair the last one given wins.
MOUNT_FLAG_PAIRS: tuple[tuple[str, str], ...] = mount_flag_pairs()


def split_layers(spec: str) -> list[str]:
    r"""Split ``a:b\:c`` into paths; a backslash escapes ``:`` and ``\``.

    The same escaping as overlayfs ``lowerdir=``, so a lowerdir string can be
    pasted unchanged.
    """
    out: list[str] = []
    cur: list[str] = []
    it = iter(spec)
    for ch in it:
        if ch == "\\":
            nxt = next(it, None)
            if nxt is None:
                raise UsageError(f"layer list ends with a lone backslash: {spec!r}")
            cur.append(nxt)
        elif ch == ":":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def parse_options(items: list[str]) -> dict[str, str]:
    """Turn ``-o a,b=c`` (possibly repeated) into a dict, unchecked; empty items are skipped.

    (:func:`build_config` reads ``-o`` through :func:`pyunionfs.options.read`,
    which checks each item against the option table.)"""
    opts: dict[str, str] = {}
    for item in items:
        for part in split_items(item):
            key, eq, value = part.partition("=")
            opts[key] = unescape(value) if eq else ""
    return opts


@dataclass(frozen=True, slots=True)
class MountConfig:
    """Validated settings of one mount.  Paths are absolute bytes."""

    lowers: tuple[bytes, ...]
    upper: bytes | None
    mountpoint: bytes
    workdir: bytes | None = None
    readonly: bool = False
    userxattr: bool = False
    oci_whiteouts: bool = True
    #: Whether the kernel enforces POSIX ACLs (FUSE_POSIX_ACL), as it does on
    #: its own overlayfs; ``noacl`` leaves it to the mode bits.
    acl: bool = True
    #: Long, as lowers do not change under a mount and every change to the
    #: upper comes through us (the kernel updates its caches for those).
    timeout: float = DEFAULT_TIMEOUT
    allow_other: bool = False
    foreground: bool = False
    debug: bool = False
    #: Which FUSE engine serves the mount: ``native`` (:mod:`pyunionfs.fuse`)
    #: or ``pyfuse3`` (the reference engine, :mod:`pyunionfs.fuse.pyfuse3_engine`).
    engine: str = "native"
    #: Whether the native engine may answer opens with FUSE passthrough.
    passthrough: bool = True
    #: ``passthrough=all`` (or a read-only mount): lower files opened to read go passthrough too.
    lower_passthrough: bool = False
    #: Whether the native engine takes requests over io_uring where the kernel offers it.
    uring: bool = True
    #: The kernel's ``redirect_dir`` mode: ``on``, ``follow``, ``off`` or ``nofollow``.
    redirect_dir: str = "follow"
    #: The kernel's ``metacopy``: metadata changes of a lower file copy up
    #: only the metadata, and such copies in the layers are followed to their data.
    metacopy: bool = False
    #: fuse-overlayfs's owner options (see :mod:`pyunionfs.fs.idmap`): the
    #: ``uidmapping=``/``gidmapping=`` ranges as (stored, shown, count), and
    #: the owner and group every file shows as (``squash_*``), if any.
    uid_ranges: tuple[tuple[int, int, int], ...] = ()
    gid_ranges: tuple[tuple[int, int, int], ...] = ()
    squash_uid: int | None = None
    squash_gid: int | None = None
    #: fuse-overlayfs's ``xattr_permissions=``: 0, or 1/2 to keep owners and
    #: modes of the upper in a ``security.``/``user.`` record (:mod:`pyunionfs.fs.override`).
    xattr_permissions: int = 0
    #: Kernel mount flags asked for (``dev``, ``nosuid``...); FUSE's defaults
    #: (nodev, nosuid, exec) apply to the ones not given.
    mount_flags: tuple[str, ...] = ()
    #: The source the mount table shows (``-o fsname=``, or the drop-in form's SOURCE).
    fsname: str = DEFAULT_FSNAME
    extra: tuple[str, ...] = field(default_factory=tuple)
    #: Handles one unprivileged caller uid may hold (0: the default share, see :mod:`.handles`).
    max_files_per_uid: int = 0

    @property
    def layers(self) -> tuple[bytes, ...]:
        """Every layer, topmost first: the upper (if any), then the lowers."""
        return ((self.upper,) if self.upper is not None else ()) + self.lowers


def _absolute(path: str, what: str) -> bytes:
    if not path:
        raise UsageError(f"empty {what} path")
    return os.fsencode(os.path.abspath(path))


def _require_dir(path: bytes, what: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{what} {os.fsdecode(path)} does not exist") from None
    except OSError as exc:
        raise UsageError(f"{what} {os.fsdecode(path)}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{what} {os.fsdecode(path)} is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UsageError(f"{what} {os.fsdecode(path)} is not readable")


def _check_overlaps(layers: list[bytes], mountpoint: bytes) -> None:
    """Refuse a layer given twice, layers nested in each other, and a mountpoint
    nested in a layer (or holding one).  The kernel refuses nested lowers with
    ELOOP; for us a nested layer would also reappear below itself.  A mountpoint
    equal to a lower (the "make this directory writable" idiom) is allowed: the
    daemon opens its layers before the mount covers them.
    """
    real = [(p, os.path.realpath(p)) for p in layers]
    seen: set[bytes] = set()
    for p, r in real:
        if r in seen:
            raise UsageError(f"layer {os.fsdecode(p)} is given twice")
        seen.add(r)
    mnt = os.path.realpath(mountpoint)
    for p, r in real:
        for q, other in real + [(mountpoint, mnt)]:
            if other.startswith(r + b"/") or (other != r and r.startswith(other + b"/")):
                inner, outer = (q, p) if other.startswith(r + b"/") else (p, q)
                raise UsageError(
                    f"{os.fsdecode(inner)} is inside {os.fsdecode(outer)}: layers and the mountpoint must not nest"
                )


def default_workdir(upper: bytes) -> bytes:
    """A hidden directory beside the upper: on the same filesystem (usually),
    outside the merged view, and found again at the next mount of that upper."""
    parent, _, name = upper.rstrip(b"/").rpartition(b"/")
    return (parent or b"") + b"/." + name + b".pyunionfs-work"


def _check_workdir(workdir: bytes, upper: bytes, lowers: list[bytes], mountpoint: bytes) -> None:
    """The work dir must be a directory (or creatable) on the upper's
    filesystem, and must not overlap a layer or the mountpoint."""
    real = os.path.realpath(workdir)
    for p in [upper, *lowers, mountpoint]:
        r = os.path.realpath(p)
        if real == r or real.startswith(r + b"/") or r.startswith(real + b"/"):
            raise UsageError(
                f"work directory {os.fsdecode(workdir)} overlaps {os.fsdecode(p)}: it must be outside the layers"
            )
    probe = workdir
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UsageError(f"work directory {os.fsdecode(workdir)}: {os.fsdecode(probe)} is not a directory")
    if os.stat(probe).st_dev != os.stat(upper).st_dev:
        raise UsageError(
            f"work directory {os.fsdecode(workdir)} is not on the upper's filesystem (choose one with -o workdir=DIR)"
        )


def _redirect_dir(opts: dict[str, str], mode: str) -> str:
    """The ``redirect_dir`` mode, as the kernel settles it: ``metacopy=on``
    needs ``on`` (its renamed copies carry redirects), implies it when none
    is given, and refuses any other given one."""
    if opts.get("metacopy") != "on":
        return mode
    if "redirect_dir" in opts and mode != "on":
        raise UsageError(f"conflicting options: metacopy=on,redirect_dir={mode} (metacopy=on needs redirect_dir=on)")
    return "on"


def mount_flags(items: list[str]) -> tuple[str, ...]:
    """The kernel mount flags of ``-o`` *items* (possibly repeated, comma
    separated): of ``dev``/``nodev`` and the other pairs, the last one given."""
    last: dict[str, str] = {}
    for item in items:
        for part in split_items(item):
            for pair in MOUNT_FLAG_PAIRS:
                if part in pair:
                    last[pair[0]] = part
    return tuple(last[pair[0]] for pair in MOUNT_FLAG_PAIRS if pair[0] in last)


def trusted_xattrs_usable(path: bytes) -> bool:
    """Whether this process may write ``trusted.*`` xattrs on *path*.

    That takes CAP_SYS_ADMIN in the initial user namespace: root inside a user
    namespace (``unshare -Ur``, rootless containers) has uid 0 and every
    capability of its own namespace but still gets EPERM, so uid and
    capability sets cannot tell.  The probe asks the kernel directly and
    writes nothing: replacing a trusted xattr that does not exist fails with
    ENODATA when allowed, with EPERM when not (the permission check comes
    first), and with EOPNOTSUPP where the filesystem has no trusted xattrs.
    """
    name = b"trusted.pyunionfs.probe"
    try:
        os.getxattr(path, name)
        return True  # it exists, and we could read it: only a privileged process can
    except OSError:
        pass
    try:
        os.setxattr(path, name, b"", os.XATTR_REPLACE)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.EPERM, errno.EOPNOTSUPP):
            return exc.errno == errno.ENODATA
        # EROFS and the like come before the permission check: guess from the
        # ids, root of the initial user namespace being privileged.
        return os.geteuid() == 0 and _initial_user_namespace()
    os.removexattr(path, name)  # appeared meanwhile; we replaced it: take it away again
    return True


def _initial_user_namespace() -> bool:
    """Whether this process's user namespace maps every id to itself, as only the initial one does."""
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return True


def build_config(
    lowers: str,
    upper: str,
    mountpoint: str,
    options: list[str],
    foreground: bool = False,
    debug: bool = False,
    *,
    workdir: str | None = None,
    fsname: str | None = None,
) -> MountConfig:
    """Validate the ``mount`` arguments; raise UsageError naming the problem.

    Relative paths are made absolute here, before the daemon detaches and
    changes its directory to ``/``.  *workdir*, when given, stands for
    ``-o workdir=`` (for a path that holds a comma); *fsname*, when given,
    is the mount's source unless ``-o fsname=`` names another.

    ``userxattr`` is turned on when the process cannot write ``trusted.*``
    xattrs on the upper (see :func:`trusted_xattrs_usable`), as the kernel's
    overlayfs needs ``-o userxattr`` in a user namespace: markers are then
    written, and read, as ``user.overlay.*``.
    """
    # Checked against the option table first: a bad option is reported before any path is looked at.
    opts = {given.row.name: given.value for given in read(options, Form.MOUNT, mountpoint)}
    if workdir is not None:
        opts["workdir"] = workdir
    lower_paths = [_absolute(p, "lower layer") for p in split_layers(lowers)]
    if not lower_paths:
        raise UsageError("at least one lower layer is needed")
    for p in lower_paths:
        _require_dir(p, "lower layer")
    readonly = "ro" in opts or not upper
    upper_path = None if not upper else _absolute(upper, "upper")
    if upper_path is not None:
        _require_dir(upper_path, "upper")
        if "ro" in opts:
            # Read-only with an upper: the upper is read as the top layer.
            lower_paths.insert(0, upper_path)
            upper_path = None
    mnt = _absolute(mountpoint, "mountpoint")
    _require_dir(mnt, "mountpoint")
    _check_overlaps(lower_paths + ([upper_path] if upper_path else []), mnt)
    work: bytes | None = None
    if upper_path is not None and not readonly:
        work = _absolute(opts["workdir"], "workdir") if opts.get("workdir") else default_workdir(upper_path)
        _check_workdir(work, upper_path, lower_paths, mnt)

    def setting(name: str) -> str:
        """The value given for option *name*, else the table's default (valid: read() checked it)."""
        return opts.get(name, option(name).default or "")

    userxattr = "userxattr" in opts
    if upper_path is not None and not readonly and not userxattr:
        userxattr = not trusted_xattrs_usable(upper_path)
    return MountConfig(
        lowers=tuple(lower_paths),
        upper=upper_path,
        mountpoint=mnt,
        workdir=work,
        readonly=readonly,
        userxattr=userxattr,
        oci_whiteouts=setting("oci_whiteouts") == "on",
        acl="noacl" not in opts,
        timeout=float(setting("timeout")),
        allow_other="allow_other" in opts or os.geteuid() == 0,
        foreground=foreground,
        debug=debug or "debug" in opts,
        engine=setting("engine"),
        passthrough=setting("passthrough") != "off",
        # Read-only, nothing is ever copied up: lower passthrough changes nothing one can see.
        lower_passthrough=setting("passthrough") == "all" or (readonly and setting("passthrough") == "on"),
        uring=setting("uring") == "on",
        redirect_dir=_redirect_dir(opts, setting("redirect_dir")),
        metacopy=setting("metacopy") == "on",
        uid_ranges=id_ranges(opts["uidmapping"], "uidmapping") if opts.get("uidmapping") else (),
        gid_ranges=id_ranges(opts["gidmapping"], "gidmapping") if opts.get("gidmapping") else (),
        squash_uid=int(opts["squash_to_uid"]) if "squash_to_uid" in opts else (0 if "squash_to_root" in opts else None),
        squash_gid=int(opts["squash_to_gid"]) if "squash_to_gid" in opts else (0 if "squash_to_root" in opts else None),
        xattr_permissions=int(setting("xattr_permissions")),
        mount_flags=mount_flags(options),
        fsname=check_fsname(opts.get("fsname", fsname or DEFAULT_FSNAME)),
        max_files_per_uid=int(opts.get("max_files_per_uid", "0")),  # 0: the default share
    )
