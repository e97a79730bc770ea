"""pyunionfs: a union filesystem in userspace, compatible on disk with overlayfs.

Four parts, imports running one way (``tests/unit/test_imports.py`` checks):

- :mod:`.fs`: the union filesystem without FUSE (:class:`~.fs.union.UnionFS`
  reads, :class:`~.fs.writes.WritableUnionFS` writes);
- :mod:`.fuse`: serving it to the kernel (our own FUSE engine, or pyfuse3 as a
  reference) and the daemon's life;
- :mod:`.image`: an upper's changes, OCI layer tars, layouts and the store;
- :mod:`.cli`: the command lines.

:mod:`.errors`, :mod:`.options` (the one option table) and :mod:`.config` sit above
them all and are used by all.
"""

from .config import VERSION
from .config import MountConfig as MountConfig
from .fs.union import UnionFS as UnionFS

__all__ = ["MountConfig", "UnionFS"]
__version__ = VERSION
