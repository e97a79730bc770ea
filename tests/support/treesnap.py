"""Snapshots of a directory tree as the user sees it, for comparing mounts.

Why: differential tests mount the same layers with the kernel's overlayfs and
with pyunionfs and must check that the two merged trees are the same.  A
snapshot records everything a program can observe about each name without
following symlinks, and nothing that legitimately differs between two
filesystems: inode numbers and directory link counts are left out, and
hardlinks are recorded as *groups of paths* sharing an inode, so that
grouping is compared rather than numbers.  Timestamps are optional
(``mtime=True``) because atime changes when files are read.

Paths are bytes relative to the root (the root itself is ``b"."``), since
layer names may not be valid UTF-8.
"""

from __future__ import annotations

import errno as _errno
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

__all__ = ["Entry", "Snapshot", "diff", "fmt_path", "snapshot"]

_KINDS = {
    stat.S_IFREG: "reg",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "lnk",
    stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
    stat.S_IFSOCK: "sock",
}
# Errors that just mean "this object has no xattrs you may see".
_NO_XATTRS = frozenset({_errno.ENOTSUP, _errno.EOPNOTSUPP, _errno.EPERM})


@dataclass(frozen=True)
class Entry:
    """What is observable about one name (fields not applicable are None).

    ``links`` is, for non-directories, the sorted paths in the snapshot that
    share this entry's inode (itself included).  ``read_errno`` is set when a
    regular file could not be read (then ``sha256`` is None).
    """

    kind: str
    mode: int
    uid: int
    gid: int
    size: int | None = None
    sha256: str | None = None
    read_errno: int | None = None
    target: bytes | None = None
    rdev: int | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()
    links: tuple[bytes, ...] | None = None
    mtime_ns: int | None = None


@dataclass(frozen=True)
class Snapshot:
    """An immutable, comparable picture of a tree.

    ``entries`` is sorted by path.  ``errors`` lists ``(path, operation,
    errno)`` for things that failed while walking, e.g. a name listed by
    readdir whose lstat fails, or a directory that cannot be listed; they
    take part in ``==`` because they are observable behaviour too.  ``root``
    is informational and does not take part in ``==``.
    """

    entries: tuple[tuple[bytes, Entry], ...]
    errors: tuple[tuple[bytes, str, int], ...] = ()
    root: bytes = field(default=b"", compare=False)
    _index: dict[bytes, Entry] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", dict(self.entries))

    def __getitem__(self, path: bytes | str) -> Entry:
        return self._index[os.fsencode(path)]

    def get(self, path: bytes | str, default: Entry | None = None) -> Entry | None:
        return self._index.get(os.fsencode(path), default)

    def __contains__(self, path: object) -> bool:
        return isinstance(path, (bytes, str)) and os.fsencode(path) in self._index

    def __iter__(self) -> Iterator[bytes]:
        return (p for p, _ in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def items(self) -> tuple[tuple[bytes, Entry], ...]:
        return self.entries

    def as_dict(self) -> dict[bytes, Entry]:
        return dict(self._index)

    def subset(self, keep: Callable[[bytes, Entry], bool]) -> Snapshot:
        """A snapshot with only the entries *keep* accepts.

        Why: to ignore parts that legitimately differ (e.g. ``lost+found``)
        while still comparing the rest with ``==``.  Hardlink groups and
        errors are pruned to the kept paths so they stay comparable.
        """
        kept = {p: e for p, e in self.entries if keep(p, e)}
        out = []
        for p, e in kept.items():
            if e.links is not None:
                e = _replace(e, links=tuple(x for x in e.links if x in kept))
            out.append((p, e))
        errors = tuple(err for err in self.errors if _parent(err[0]) in kept or err[0] in kept)
        return Snapshot(tuple(out), errors, self.root)


def _replace(e: Entry, **changes: object) -> Entry:
    d = {f.name: getattr(e, f.name) for f in fields(e)}
    d.update(changes)
    return Entry(**d)  # type: ignore[arg-type]


def _parent(path: bytes) -> bytes:
    return path.rpartition(b"/")[0] or b"."


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), f"0o{stat.S_IFMT(mode):o}")


def _hash_file(path: bytes) -> tuple[str | None, int | None]:
    """sha256 of a regular file, or the errno that prevented reading it.

    O_NOFOLLOW so a name swapped for a symlink is never followed; O_NONBLOCK
    so a name swapped for a FIFO cannot hang the walk.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        return None, e.errno
    try:
        h = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
        return h.hexdigest(), None
    except OSError as e:
        return None, e.errno
    finally:
        os.close(fd)


def _read_xattrs(
    path: bytes, rel: bytes, ignore: tuple[str, ...], errors: list[tuple[bytes, str, int]]
) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno not in _NO_XATTRS:
            errors.append((rel, "listxattr", e.errno or 0))
        return ()
    out = []
    for name in names:
        if name.startswith(ignore):
            continue
        try:
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError as e:
            if e.errno not in _NO_XATTRS:
                errors.append((rel, "getxattr " + name, e.errno or 0))
    return tuple(sorted(out))


def snapshot(root: Path | bytes | str, *, mtime: bool = False, ignore_xattrs: tuple[str, ...] = ()) -> Snapshot:
    """Walk *root* (never following symlinks) and record every name under it.

    *mtime* also records ``st_mtime_ns``.  xattrs whose name starts with one
    of *ignore_xattrs* are skipped (e.g. ``("trusted.overlay.",)`` when
    snapshotting a layer directory and only caring about user-visible data).
    """
    root_b = os.fsencode(root)
    raw: dict[bytes, dict[str, object]] = {}
    inodes: dict[tuple[int, int], list[bytes]] = {}
    errors: list[tuple[bytes, str, int]] = []

    def record(rel: bytes, full: bytes, st: os.stat_result) -> None:
        kind = _kind(st.st_mode)
        info: dict[str, object] = {"kind": kind, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid}
        if kind != "dir":
            info["size"] = st.st_size
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            info["_ino"] = (st.st_dev, st.st_ino)
        if kind == "reg":
            info["sha256"], info["read_errno"] = _hash_file(full)
        elif kind == "lnk":
            try:
                info["target"] = os.readlink(full)
            except OSError as e:
                errors.append((rel, "readlink", e.errno or 0))
        elif kind in ("chr", "blk"):
            info["rdev"] = st.st_rdev
        info["xattrs"] = _read_xattrs(full, rel, ignore_xattrs, errors)
        if mtime:
            info["mtime_ns"] = st.st_mtime_ns
        raw[rel] = info

    st = os.lstat(root_b)
    record(b".", root_b, st)
    todo: list[tuple[bytes, bytes]] = [(b".", root_b)] if stat.S_ISDIR(st.st_mode) else []
    while todo:
        rel, full = todo.pop()
        try:
            with os.scandir(full) as it:
                names = sorted(e.name for e in it)
        except OSError as e:
            errors.append((rel, "scandir", e.errno or 0))
            continue
        for name in names:
            crel = name if rel == b"." else rel + b"/" + name
            cfull = full + b"/" + name
            try:
                cst = os.lstat(cfull)
            except OSError as e:
                errors.append((crel, "lstat", e.errno or 0))
                continue
            record(crel, cfull, cst)
            if stat.S_ISDIR(cst.st_mode):
                todo.append((crel, cfull))

    entries = []
    for rel in sorted(raw):
        info = raw[rel]
        ino = info.pop("_ino", None)
        if ino is not None:
            info["links"] = tuple(sorted(inodes[ino]))  # type: ignore[index]
        entries.append((rel, Entry(**info)))  # type: ignore[arg-type]
    return Snapshot(tuple(entries), tuple(sorted(errors)), root_b)


# --------------------------------------------------------------------------
# Differences
# --------------------------------------------------------------------------


def fmt_path(path: bytes) -> str:
    """Readable, unambiguous rendering of a path (``\\n``, ``\\xe9`` escaped)."""
    return repr(path)[2:-1]


def _errname(n: int | None) -> str:
    return "None" if n is None else _errno.errorcode.get(n, str(n))


def _fmt_value(name: str, v: object) -> str:
    if v is None:
        return "None"
    if name == "mode":
        return f"0o{v:o}"
    if name == "sha256":
        return str(v)[:12]
    if name == "read_errno":
        return _errname(v)  # type: ignore[arg-type]
    if name == "rdev":
        return f"{os.major(v)}:{os.minor(v)}"  # type: ignore[arg-type]
    if name == "links":
        return "(" + ", ".join(fmt_path(p) for p in v) + ")"  # type: ignore[attr-defined]
    return repr(v)


def _entry_diff(path: bytes, a: Entry, b: Entry) -> list[str]:
    p = fmt_path(path)
    if a.kind != b.kind:
        return [f"{p}: kind {a.kind} != {b.kind}"]
    out = []
    for f in fields(Entry):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if va == vb:
            continue
        if f.name == "xattrs":
            xa, xb = dict(va), dict(vb)
            for k in sorted(set(xa) | set(xb)):
                if xa.get(k) != xb.get(k):
                    sa = repr(xa[k]) if k in xa else "(absent)"
                    sb = repr(xb[k]) if k in xb else "(absent)"
                    out.append(f"{p}: xattr {k} {sa} != {sb}")
        else:
            out.append(f"{p}: {f.name} {_fmt_value(f.name, va)} != {_fmt_value(f.name, vb)}")
    return out


def diff(a: Snapshot, b: Snapshot, limit: int | None = 30) -> list[str]:
    """Human-readable differences between two snapshots; [] iff ``a == b``.

    At most *limit* lines (None: all), then one ``... N more`` line.
    """
    da, db = a.as_dict(), b.as_dict()
    lines: list[str] = []
    for path in sorted(set(da) | set(db)):
        if path not in db:
            lines.append(f"only in A: {fmt_path(path)} ({da[path].kind})")
        elif path not in da:
            lines.append(f"only in B: {fmt_path(path)} ({db[path].kind})")
        else:
            lines.extend(_entry_diff(path, da[path], db[path]))
    ea, eb = set(a.errors), set(b.errors)
    for tag, only in (("A", ea - eb), ("B", eb - ea)):
        for path, op, err in sorted(only):
            lines.append(f"error only in {tag}: {fmt_path(path)}: {op} {_errname(err)}")
    if limit is not None and len(lines) > limit:
        lines = lines[:limit] + [f"... {len(lines) - limit} more difference(s)"]
    return lines
