"""pyunionfs: a union filesystem in userspace, compatible on disk with overlayfs.

The union core (:mod:`.union` and what it uses) has no FUSE dependency;
:mod:`.fuse` serves it to the kernel (its own FUSE engine, or pyfuse3 as a
reference) and :mod:`.mount` runs the daemon.
"""

from .config import MountConfig as MountConfig
from .union import UnionFS as UnionFS

__all__ = ["MountConfig", "UnionFS"]
__version__ = "0.1.0"
