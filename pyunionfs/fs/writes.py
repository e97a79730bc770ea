"""The write path: every change through the mount, with overlayfs's semantics.

:class:`WritableUnionFS` adds the mutating requests to :class:`~.union.UnionFS`.
The rules are the kernel's (``fs/overlayfs/dir.c``, ``copy_up.c``):

* the first change to an object that only a lower layer has copies it up
  (parents first), atomically, through the work dir (:mod:`.copyup`);
* removing a name leaves a whiteout when a lower layer still has it
  ("lower positive"), else just removes the upper entry;
* a new name replaces an upper whiteout in one rename, and a directory made
  there is opaque;
* a directory with lower parts is not renamed (EXDEV: ``redirect_dir=off``);
  an upper-only directory moved into a merged parent becomes opaque.

The requests are grouped by the state they change, one module each, and
:class:`WritableUnionFS` is assembled from them (see :mod:`.writable` for
why a class and not a composition of objects):

* :mod:`.writable`: the upper and its copy-up side, shared by all;
* :mod:`.creates`: new names (mkdir, mknod, symlink, link);
* :mod:`.openfiles`: open files and writes to them (open, create, O_TMPFILE);
* :mod:`.removes`: names that go (unlink, rmdir, rename);
* :mod:`.attributes`: attributes and xattrs.

Copy-up itself (which object, when, the per-object lock) is
:class:`~.copyups.CopyUps`.  Every request that names an inode reaches that
object through :meth:`~.union.UnionFS.open_object` and its siblings, never
through whatever holds its old name now; before a name the kernel may still
hold goes away, its object is pinned (:meth:`.removes.Removes._name_goes`).
"""

from __future__ import annotations

from .attributes import Attributes, SetAttr
from .callers import Caller
from .openfiles import OpenFiles
from .removes import Removes


class WritableUnionFS(OpenFiles, Removes, Attributes):
    """A :class:`~.union.UnionFS` that also takes changes (EROFS when mounted read-only)."""


__all__ = ["Caller", "SetAttr", "WritableUnionFS"]
