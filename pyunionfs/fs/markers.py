"""The only code that knows the on-disk deletion and opacity formats.

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

import os
import stat
from collections.abc import Callable

OCI_PREFIX = b".wh."
OCI_OPAQUE = b".wh..wh..opq"
#: Names under this prefix are reserved by the OCI layer format (``.wh..wh..opq`` is the only one in use).
OCI_RESERVED = b".wh..wh."

_TRUSTED = b"trusted.overlay."
_USER = b"user.overlay."
_ESCAPE = b"overlay."


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
    """Marker rules for one mount (which namespaces, whether OCI names count)."""

    def __init__(self, userxattr: bool = False, oci: bool = True, trusted_ok: bool = True) -> None:
        self.oci = oci
        self.prefixes: tuple[bytes, ...] = (_USER,) if userxattr else (_TRUSTED, _USER)
        self.write_prefix = _USER if userxattr or not trusted_ok else _TRUSTED
        self.opaque_xattr = self.write_prefix + b"opaque"
        self.origin_xattr = self.write_prefix + b"origin"
        self.impure_xattr = self.write_prefix + b"impure"
        self.nlink_xattr = self.write_prefix + b"nlink"
        self.opaque_names = tuple(p + b"opaque" for p in self.prefixes)
        self.whiteout_names = tuple(p + b"whiteout" for p in self.prefixes)

    # -- whiteouts -------------------------------------------------------

    @staticmethod
    def is_device_whiteout(st: os.stat_result) -> bool:
        """A character device 0/0: the kernel's own whiteout."""
        return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0

    @staticmethod
    def make_whiteout(dir_fd: int, name: bytes) -> None:
        """Create a whiteout *name* in directory *dir_fd* (fails if *name* exists)."""
        os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=dir_fd)

    def may_be_xwhiteout(self, st: os.stat_result) -> bool:
        """Whether *st* has the shape of an xattr whiteout (xattr not yet read)."""
        return stat.S_ISREG(st.st_mode) and st.st_size == 0

    def has_whiteout_xattr(self, names: list[bytes]) -> bool:
        return any(n in self.whiteout_names for n in names)

    def oci_whiteout_name(self, name: bytes) -> bytes | None:
        """The ``.wh.`` file that would hide *name*, if OCI markers are honoured."""
        if not self.oci or len(name) + len(OCI_PREFIX) > 255:
            return None
        return OCI_PREFIX + name

    def is_oci_marker(self, name: bytes) -> bool:
        """Names that are markers, never entries, in an OCI layer."""
        return self.oci and name.startswith(OCI_PREFIX)

    # -- opacity ---------------------------------------------------------

    def set_opaque(self, path: bytes, follow: bool = False) -> None:
        """Mark directory *path* (a /proc/self/fd path) opaque, the kernel's way;
        *follow* only for a bare /proc/self/fd/N magic link."""
        os.setxattr(path, self.opaque_xattr, b"y", follow_symlinks=follow)

    def opaque_value(self, getxattr: Callable[[bytes], bytes], names: list[bytes]) -> bytes | None:
        """The directory's ``overlay.opaque`` value (``y``, ``x``) or None."""
        for n in self.opaque_names:
            if n in names:
                return bytes(getxattr(n))
        return None

    # -- the overlay's own records -------------------------------------

    #: Records that leave an upper entry's data (``metacopy``) or its
    #: directory contents (``redirect``) at another place in a lower layer:
    #: such an upper cannot be read on its own, e.g. into an image layer.
    LOWER_DEPENDENT = (b"redirect", b"metacopy")

    def has_record(self, names: list[bytes], record: bytes) -> bool:
        """Whether *names* (an entry's stored xattr names) hold the overlay's
        ``overlay.<record>`` xattr (``origin``, ``redirect``...) in a namespace we read."""
        return any(p + record in names for p in self.prefixes)

    # -- xattr names seen through the mount -----------------------------

    def visible_xattr(self, real: bytes) -> bytes | None:
        """The name a stored xattr has through the mount; None if private."""
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
