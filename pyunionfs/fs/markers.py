"""The only code that knows the on-disk deletion and opacity formats.

Every reader of layers (the resolver, the write path, ``diff``/``commit`` of
an upper, layer tools) asks one :class:`Markers` object per mount "is this a
whiteout here?", "is this directory opaque?", instead of testing devices,
xattrs or names itself; so a new format is one change here.  A unit test
(``tests/unit/test_core_markers.py``) checks that no other module does.

Formats read (any layer):

* kernel overlayfs: a whiteout is a character device 0/0; a directory is opaque
  when its ``overlay.opaque`` xattr is ``y``;
* kernel "xattr whiteouts" (Linux 6.7+, for layers stored on an overlay): a
  zero-size regular file with an ``overlay.whiteout`` xattr, inside a
  directory whose ``overlay.opaque`` is ``x`` (which does not make it opaque);
* OCI image layers: ``.wh.NAME`` hides NAME in the layers below, and
  ``.wh..wh..opq`` inside a directory makes it opaque.

``overlay.*`` means ``trusted.overlay.*`` or ``user.overlay.*``.  The kernel
reads one namespace per mount (``userxattr`` picks ``user.``); we read both
unless ``userxattr`` is given, because the same image layers are unpacked by
root tools (trusted) and by rootless ones (user) and a union of both is common.
Deliberate difference from the kernel, which would show ``user.overlay.*``
xattrs of a root mount as ordinary xattrs: we hide them.

Formats written (upper only), the kernel's: 0/0 character devices, and
``overlay.opaque=y`` in ``trusted.`` (``user.`` with ``userxattr`` or when
not privileged).  Nothing else of ours is ever stored in a layer.

Escaping (as the kernel does for nested overlays): a stored
``trusted.overlay.overlay.X`` is shown as ``trusted.overlay.X``.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Container
from typing import Protocol

from ..errors import fs_error
from .entry import StatLike
from .paths import join

OCI_PREFIX = b".wh."
OCI_OPAQUE = b".wh..wh..opq"
#: Names under this prefix are reserved by the OCI layer format (``.wh..wh..opq`` is the only one in use).
OCI_RESERVED = b".wh..wh."

#: :meth:`Markers.opaque` of a directory that hides the layers below it.
OPAQUE = b"y"
#: :meth:`Markers.opaque` of a directory that may hold xattr whiteouts
#: (:meth:`Markers.is_whiteout`'s *in_xdir*); it is not opaque.
XWHITEOUTS = b"x"

_TRUSTED = b"trusted.overlay."
_USER = b"user.overlay."
_ESCAPE = b"overlay."

_S_ISCHR = stat.S_ISCHR
#: The sizes a non-empty ``overlay.metacopy`` record may have (``struct
#: ovl_metacopy``: 4 bytes of header and up to a 64-byte digest).
_METACOPY_MIN, _METACOPY_MAX = 4, 68
_S_ISREG = stat.S_ISREG


class LayerView(Protocol):
    """What marker checks read of a layer (a :class:`.layers.LayerStack`):
    entries by (layer, directory, name) and xattrs by (layer, path)."""

    def lstat(self, layer: int, rel: bytes, name: bytes) -> os.stat_result | None: ...

    def listxattr(self, layer: int, rel: bytes, strict: bool = False) -> list[bytes]: ...

    def getxattr(self, layer: int, rel: bytes, name: bytes) -> bytes: ...


def classify_oci_name(name: bytes) -> tuple[str, bytes]:
    """What the file name *name* means in an OCI image layer.

    ``("entry", name)`` for an ordinary name, ``("opaque", b"")`` for
    ``.wh..wh..opq``, ``("whiteout", NAME)`` for ``.wh.NAME``, and
    ``("invalid", name)`` for marker-shaped names that hide nothing a layer
    may name: ``.wh.``, ``.wh..`` and ``.wh...`` would hide the directory
    holding them or its parent, and other ``.wh..wh.`` names are reserved.
    Why here: layer tools (``apply``, ``commit``) must agree with the
    union's reading of OCI markers, so the rule lives with the other formats.
    """
    if not name.startswith(OCI_PREFIX):
        return "entry", name
    if name == OCI_OPAQUE:
        return "opaque", b""
    target = name[len(OCI_PREFIX) :]
    if target in (b"", b".", b"..") or name.startswith(OCI_RESERVED):
        return "invalid", name
    return "whiteout", target


class Markers:
    """Marker rules for one mount (which namespaces, whether OCI names count).

    The questions are asked of a :class:`LayerView` with the entry's stat
    already in hand, so the common case (an ordinary entry) costs no
    syscall here: xattrs are read only for the shapes that may be markers.
    """

    def __init__(self, userxattr: bool = False, oci: bool = True, trusted_ok: bool = True) -> None:
        self.oci = oci
        self.prefixes: tuple[bytes, ...] = (_USER,) if userxattr else (_TRUSTED, _USER)
        self.write_prefix = _USER if userxattr or not trusted_ok else _TRUSTED
        self.opaque_xattr = self.write_prefix + b"opaque"
        self.origin_xattr = self.write_prefix + b"origin"
        self.impure_xattr = self.write_prefix + b"impure"
        self.nlink_xattr = self.write_prefix + b"nlink"
        self.redirect_xattr = self.write_prefix + b"redirect"
        self.metacopy_xattr = self.write_prefix + b"metacopy"
        self.metacopy_names = self.record_names(b"metacopy")
        self.opaque_names = self.record_names(b"opaque")
        self.whiteout_names = self.record_names(b"whiteout")
        #: The overlay's ``origin`` / ``nlink`` records, in the order they are read.
        self.origin_names = self.record_names(b"origin")
        self.nlink_names = self.record_names(b"nlink")
        #: A prefix of names hidden through the mount besides the overlay's
        #: own (fuse-overlayfs's ``user.fuseoverlayfs.``, where records are kept).
        self.hidden: bytes | None = None

    # -- whiteouts -------------------------------------------------------

    @staticmethod
    def is_device_whiteout(st: os.stat_result) -> bool:
        """A character device 0/0: the kernel's own whiteout."""
        return _S_ISCHR(st.st_mode) and st.st_rdev == 0

    @staticmethod
    def is_whiteout_node(mode: int, rdev: int) -> bool:
        """Whether a node made with *mode* and *rdev* (mknod, a tar member)
        would read back as a whiteout."""
        return _S_ISCHR(mode) and rdev == 0

    def is_whiteout(
        self, st: os.stat_result, in_xdir: bool, view: LayerView, layer: int, parent_rel: bytes, name: bytes
    ) -> bool:
        """Whether entry *name* (stat *st*) of directory *parent_rel* in
        *layer* is a whiteout: a 0/0 device, or an xattr whiteout when its
        directory is an ``overlay.opaque=x`` one (*in_xdir*)."""
        mode = st.st_mode
        if _S_ISCHR(mode):
            return st.st_rdev == 0
        if not in_xdir or not _S_ISREG(mode) or st.st_size != 0:
            return False
        names = view.listxattr(layer, join(parent_rel, name))
        return any(n in self.whiteout_names for n in names)

    def oci_whiteout(
        self, view: LayerView, layer: int, parent_rel: bytes, name: bytes, beside: Container[bytes] | None = None
    ) -> bool:
        """Whether *layer* hides *name* (absent there) with a ``.wh.NAME`` beside it.
        *beside*: the names of *parent_rel* in *layer*, when the caller has read them."""
        wh = self.oci_whiteout_name(name)
        if wh is None:
            return False
        if beside is not None:
            return wh in beside
        return view.lstat(layer, parent_rel, wh) is not None

    @staticmethod
    def make_whiteout(dir_fd: int, name: bytes) -> None:
        """Create a whiteout *name* in directory *dir_fd* (fails if *name* exists)."""
        os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=dir_fd)

    def oci_whiteout_name(self, name: bytes) -> bytes | None:
        """The ``.wh.`` file that would hide *name*, if OCI markers are honoured."""
        if not self.oci or len(name) + len(OCI_PREFIX) > 255:
            return None
        return OCI_PREFIX + name

    def is_oci_marker(self, name: bytes) -> bool:
        """Names that are markers, never entries, in an OCI layer."""
        return self.oci and name.startswith(OCI_PREFIX)

    # -- opacity ---------------------------------------------------------

    def opaque(self, view: LayerView, layer: int, rel: bytes, names: list[bytes] | None = None) -> bytes | None:
        """Directory *rel*'s ``overlay.opaque`` value in *layer*: :data:`OPAQUE`,
        :data:`XWHITEOUTS` (holds xattr whiteouts; not opaque), another
        value (which means nothing), or None.
        *names*: its stored xattr names, when the caller has them already."""
        if names is None:
            names = view.listxattr(layer, rel)
        for n in self.opaque_names:
            if n in names:
                try:
                    return bytes(view.getxattr(layer, rel, n))
                except OSError as exc:
                    if exc.errno in (errno.ENODATA, errno.ENOTSUP):
                        return None
                    raise
        return None

    def oci_opaque(
        self, view: LayerView, layer: int, parent_rel: bytes, name: bytes, beside: Container[bytes] | None = None
    ) -> bool:
        """OCI opacity of directory *name*: ``.wh..wh..opq`` inside it, or a
        ``.wh.NAME`` beside it (a whiteout hides only the layers below its own).
        *beside*: as for :meth:`oci_whiteout`."""
        if not self.oci:
            return False
        return self.oci_whiteout(view, layer, parent_rel, name, beside) or self.oci_opaque_inside(
            view, layer, join(parent_rel, name)
        )

    def oci_opaque_inside(self, view: LayerView, layer: int, rel: bytes) -> bool:
        """Whether directory *rel* of *layer* holds ``.wh..wh..opq``."""
        return self.oci and view.lstat(layer, rel, OCI_OPAQUE) is not None

    def set_opaque(self, path: bytes, follow: bool = False) -> None:
        """Mark directory *path* (a /proc/self/fd path) opaque, the kernel's way;
        *follow* only for a bare /proc/self/fd/N magic link."""
        os.setxattr(path, self.opaque_xattr, OPAQUE, follow_symlinks=follow)

    def is_set_opaque(self, path: bytes) -> bool:
        """Whether directory *path* (a /proc/self/fd path, not followed)
        carries the opaque marker this mount writes (:meth:`set_opaque`)."""
        try:
            return os.getxattr(path, self.opaque_xattr, follow_symlinks=False) == OPAQUE
        except OSError:
            return False

    # -- the overlay's own records -------------------------------------

    def metacopy(self, view: LayerView, layer: int, rel: bytes, st: StatLike, exact: bool = True) -> bool:
        """Whether entry *rel* of *layer* (lstat *st*) is a metadata-only copy:
        a regular file with an ``overlay.metacopy`` record, whose data is in a
        layer below (the kernel's ``ovl_check_metacopy_xattr``).  EIO for a
        malformed record, as the kernel answers.

        Not *exact*: only a file that holds less space than its size, or at
        most one block, is asked (as the kernel leaves one: a hole, with its
        records in at most one block), so most large files cost no
        listxattr (about 6 µs on a cold lookup); a copy whose hole was
        filled with zeros since (``cp`` of the upper) then reads as those
        zeros.  (The resolver asks only in directories marked impure.)
        """
        if not _S_ISREG(st.st_mode):
            return False
        held = st.st_blocks * 512
        if not exact and held >= st.st_size and held > st.st_blksize:
            return False
        # One listxattr, not a getxattr per namespace: most files have no record.
        names = view.listxattr(layer, rel)
        for key in self.metacopy_names:
            if key not in names:
                continue
            try:
                value = view.getxattr(layer, rel, key)
            except OSError as exc:
                if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                    continue
                raise
            # Empty, or the kernel's struct ovl_metacopy (version 0, its own
            # length, then flags, digest algorithm and an fs-verity digest).
            if value and not (_METACOPY_MIN <= len(value) <= _METACOPY_MAX and value[0] == 0
                              and value[1] == len(value)):
                raise fs_error(errno.EIO, rel)
            return True
        return False

    def record_names(self, record: bytes) -> tuple[bytes, ...]:
        """The stored names of the overlay's ``overlay.<record>`` xattr, in
        each namespace this mount reads (``trusted.`` first)."""
        return tuple(p + record for p in self.prefixes)

    def has_record(self, names: list[bytes], record: bytes) -> bool:
        """Whether *names* (an entry's stored xattr names) hold the overlay's
        ``overlay.<record>`` xattr (``origin``, ``redirect``...) in a namespace we read."""
        return any(p + record in names for p in self.prefixes)

    # -- xattr names seen through the mount -----------------------------

    def visible_xattr(self, real: bytes) -> bytes | None:
        """The name a stored xattr has through the mount; None if private."""
        if self.hidden is not None and real.startswith(self.hidden):
            return None
        for prefix in self.prefixes:
            if real.startswith(prefix):
                rest = real[len(prefix) :]
                if rest.startswith(_ESCAPE):
                    return prefix + rest[len(_ESCAPE) :]
                return None
        return real

    def stored_xattr(self, visible: bytes) -> bytes:
        """The stored name behind an xattr name asked for through the mount."""
        for prefix in self.prefixes:
            if visible.startswith(prefix):
                return prefix + _ESCAPE + visible[len(prefix) :]
        return visible
