"""What an upper directory changed: the one reading of an upper that ``diff`` and ``commit`` share.

An upper layer holds a container's changes in the kernel's on-disk format;
image tools want them as a list (``pyunionfs diff``, like ``docker diff``) or
as an OCI image layer (``pyunionfs commit``).  Both need the same reading of
the upper, done here once so that they cannot disagree:

* every entry, walked beneath the upper with no-follow directory fds (a
  symlink stored in the upper is reported, never followed);
* deletion and opacity markers recognised in every format :mod:`.whiteout`
  knows, read the way the union reads them: a 0/0 character device, an xattr
  whiteout in an ``overlay.opaque=x`` directory and an OCI ``.wh.NAME`` file
  are all whiteouts; ``overlay.opaque=y``, ``.wh..wh..opq`` inside a
  directory, and a ``.wh.NAME`` beside a directory ``NAME`` make it opaque;
* the overlay's private xattrs (origin, impure, nlink, opaque...) told apart
  from the user's, with escaped ``overlay.overlay.X`` names shown as
  ``overlay.X``, as the mount shows them.

Order is deterministic: a directory comes before its children, the children
of one directory come whiteouts first (what OCI asks of layer writers:
"whiteout files appear before sibling directory entries"), then entries,
each group sorted by name.

An upper that uses ``overlay.redirect`` (renamed directories, kernel
``redirect_dir=on``) or ``overlay.metacopy`` (metadata-only copy-up) keeps
part of its meaning in a lower layer; it is refused with :class:`LayerError`
rather than read wrongly.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType

from .errors import MountError
from .layers import LayerStack
from .paths import join
from .resolve import Entry, Resolver
from .whiteout import OCI_OPAQUE, Markers, classify_oci_name

__all__ = [
    "ADDED", "CHANGED", "DELETED", "LayerError", "LowerView", "UpperEntry", "UpperWalk",
    "changes", "display", "path_key",
]

ADDED = "A"
CHANGED = "C"
DELETED = "D"


class LayerError(MountError):
    """An upper or an image layer cannot be read, written or applied safely.

    A MountError, so the command line reports it the same way: one line,
    exit status 1.
    """


def path_key(path: bytes) -> tuple[bytes, ...]:
    """Sort key that orders paths component by component (``a/b`` before ``a-c``),
    which is also depth-first order: a directory right before its contents."""
    return tuple(path.split(b"/")) if path else ()


def display(path: bytes) -> str:
    """A relative path for messages."""
    return os.fsdecode(path) or "."


@dataclass(frozen=True, slots=True)
class UpperEntry:
    """One name of an upper, as an image layer sees it.

    ``path`` is relative to the upper (``b""`` is the upper itself).  For a
    whiteout, ``path`` is the name it hides and ``st`` is the marker's own
    lstat; nothing else applies.  ``xattrs`` are the user-visible ones,
    sorted by name.
    """

    path: bytes
    st: os.stat_result
    whiteout: bool = False
    opaque: bool = False
    copied_up: bool = False
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    #: This directory holds xattr whiteouts (``overlay.opaque=x``).
    xwhiteouts: bool = False

    @property
    def is_dir(self) -> bool:
        return not self.whiteout and stat.S_ISDIR(self.st.st_mode)


class UpperWalk:
    """Reads one upper directory (read-only: nothing in it is changed).

    The upper is opened as a one-layer :class:`LayerStack`, so every access
    goes through the same no-follow directory fds as the mount's.
    """

    def __init__(self, upper: bytes, markers: Markers) -> None:
        self.markers = markers
        self.stack = LayerStack((upper,), writable_top=False)

    def close(self) -> None:
        self.stack.close()

    def __enter__(self) -> UpperWalk:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- the walk ---------------------------------------------------------

    def entries(self) -> Iterator[UpperEntry]:
        """The upper's root, then every entry below it, depth-first (see the module doc).

        Iterative, with one listing per directory held at a time: an upper
        may be thousands of directories deep.
        """
        root = self._describe(b"", self.stack.stat_self(0, b""), False)
        yield root
        todo: list[Iterator[UpperEntry]] = [self._children(root)]
        while todo:
            entry = next(todo[-1], None)
            if entry is None:
                todo.pop()
                continue
            yield entry
            if entry.is_dir:
                todo.append(self._children(entry))

    def _children(self, d: UpperEntry) -> Iterator[UpperEntry]:
        rel = d.path
        names = sorted(self.stack.listdir(0, rel))
        present = set(names)
        whiteouts: dict[bytes, os.stat_result] = {}
        beside_dir: set[bytes] = set()  # NAME with a .wh.NAME next to it: opaque if a directory
        for n in names:
            if not self.markers.is_oci_marker(n):
                continue
            kind, target = classify_oci_name(n)
            if kind != "whiteout":
                continue  # the opaque marker is read with its directory; invalid ones hide nothing
            st = self.stack.lstat(0, rel, n)
            if st is None:
                continue
            if target in present:
                beside_dir.add(target)
            else:
                whiteouts[target] = st
        entries: list[UpperEntry] = []
        for n in names:
            if self.markers.is_oci_marker(n):
                continue
            st = self.stack.lstat(0, rel, n)
            if st is None:
                continue  # gone since the listing: the upper is not ours to freeze
            child = join(rel, n)
            if self.markers.is_device_whiteout(st) or (
                d.xwhiteouts
                and self.markers.may_be_xwhiteout(st)
                and self.markers.has_whiteout_xattr(self.stack.listxattr(0, child))
            ):
                whiteouts[n] = st
                continue
            entries.append(self._describe(child, st, n in beside_dir))
        out = [UpperEntry(join(rel, n), whiteouts[n], whiteout=True) for n in sorted(whiteouts)]
        out.extend(entries)
        return iter(out)

    def _describe(self, rel: bytes, st: os.stat_result, oci_opaque: bool) -> UpperEntry:
        names = self.stack.listxattr(0, rel)
        for record in Markers.LOWER_DEPENDENT:
            if self.markers.has_record(names, record):
                raise LayerError(
                    f"{display(rel)}: has an overlay.{record.decode()} record, so part of it lives in a "
                    "lower layer (written with redirect_dir=on or metacopy=on); it cannot be read on its own"
                )
        opaque = xwh = False
        if stat.S_ISDIR(st.st_mode):
            value = self._opaque_value(rel, names)
            xwh = value == b"x"
            opaque = value == b"y" or oci_opaque
            if not opaque and self.markers.oci:
                opaque = self.stack.lstat(0, rel, OCI_OPAQUE) is not None
        xattrs = []
        for name in names:
            visible = self.markers.visible_xattr(name)
            if visible is None:
                continue
            try:
                xattrs.append((visible, self.stack.getxattr(0, rel, name)))
            except OSError as exc:
                if exc.errno != errno.ENODATA:  # removed since it was listed
                    raise
        return UpperEntry(
            rel,
            st,
            opaque=opaque,
            copied_up=self.markers.has_record(names, b"origin"),
            xattrs=tuple(sorted(xattrs)),
            xwhiteouts=xwh,
        )

    def _opaque_value(self, rel: bytes, names: list[bytes]) -> bytes | None:
        try:
            return self.markers.opaque_value(lambda n: self.stack.getxattr(0, rel, n), names)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP):
                return None
            raise

    # -- contents ---------------------------------------------------------

    def open(self, rel: bytes) -> int:
        """A read-only fd of regular file *rel* (never through a symlink;
        O_NOATIME where allowed, so committing changes no atime)."""
        return self.stack.open_file(0, rel, os.O_RDONLY)

    def readlink(self, rel: bytes) -> bytes:
        return self.stack.readlink(0, rel)


class LowerView:
    """The merged view of a list of lower layers, through the union's own
    rules (:class:`.resolve.Resolver`): what existed before the upper's changes."""

    def __init__(self, lowers: Sequence[bytes], markers: Markers) -> None:
        self.stack = LayerStack(tuple(lowers), writable_top=False)
        self.resolver = Resolver(self.stack, markers)
        self._root = self.resolver.root()

    def close(self) -> None:
        self.stack.close()

    def lookup(self, rel: bytes) -> Entry | None:
        """The merged entry at *rel*; None if the lowers do not show it."""
        entry: Entry | None = self._root
        parent = b""
        for name in rel.split(b"/") if rel else []:
            if entry is None or not entry.is_dir:
                return None
            entry = self.resolver.child(entry, parent, name)
            parent = join(parent, name)
        return entry

    def names(self, rel: bytes) -> list[bytes]:
        """Names the lowers show in directory *rel* (none if it is not a directory there)."""
        entry = self.lookup(rel)
        if entry is None or not entry.is_dir:
            return []
        return [n for n, _ in self.resolver.listing(entry, rel)]


def changes(upper: bytes, markers: Markers, lowers: Sequence[bytes] | None = None) -> list[tuple[str, bytes]]:
    """``(kind, path)`` for everything the upper changed, sorted by :func:`path_key`.

    With *lowers* (topmost first) the decision is by existence in their merged
    view: a path they show is ``C`` when the upper has it and ``D`` when the
    upper deletes it (a whiteout, or a name missing below an opaque
    directory); a path they do not show is ``A``, and a whiteout of such a
    path is no change at all.  Only the topmost deleted path is listed, as
    ``docker diff`` does.

    Without lowers nothing can be looked up, so the upper's own records
    decide: a whiteout is ``D``; an opaque directory and everything below a
    path already reported ``A`` is ``A``; otherwise an entry copied up from a
    lower layer (``overlay.origin``) or a non-opaque directory (overlayfs
    only creates those to merge with a lower one) is ``C``, anything else
    ``A``.  Names hidden by an opaque directory are then unknown and not listed.
    """
    view = LowerView(lowers, markers) if lowers else None
    out: list[tuple[str, bytes]] = []
    added: set[bytes] = set()  # directories reported A (without lowers)
    # Directories whose lower contents the upper replaced (opaque, or below one).
    replaced: set[bytes] = set()
    try:
        with UpperWalk(upper, markers) as walk:
            entries = walk.entries()
            next(entries)  # the upper itself: never listed, and overlayfs ignores opacity at the root
            upper_names: dict[bytes, set[bytes]] = {}
            for e in entries:
                parent, _, name = e.path.rpartition(b"/")
                if not e.whiteout:
                    upper_names.setdefault(parent, set()).add(name)
                if view is not None:
                    existed = view.lookup(e.path) is not None
                    if e.whiteout:
                        if existed and parent not in replaced:
                            out.append((DELETED, e.path))
                        continue
                    out.append((CHANGED if existed else ADDED, e.path))
                    if e.is_dir and (e.opaque or parent in replaced):
                        replaced.add(e.path)
                    continue
                if e.whiteout:
                    out.append((DELETED, e.path))
                    continue
                fresh = parent in added or e.opaque
                kind = CHANGED if not fresh and (e.copied_up or e.is_dir) else ADDED
                if kind == ADDED and e.is_dir:
                    added.add(e.path)
                out.append((kind, e.path))
            if view is not None:
                for d in sorted(replaced):
                    have = upper_names.get(d, set())
                    out.extend((DELETED, join(d, n)) for n in view.names(d) if n not in have)
    except OSError as exc:
        where = os.path.join(os.fsdecode(upper), os.fsdecode(exc.filename or b""))
        raise LayerError(f"{where}: {exc.strerror or exc}") from None
    finally:
        if view is not None:
            view.close()
    out.sort(key=lambda c: path_key(c[1]))
    return out
