"""Load :file:`_fuseshim.c` so that it sits under pyfuse3, before pyfuse3 loads.

The shim adds what pyfuse3 3.5 does not expose (kernel-cached directory
listings, fallocate) by standing in for libfuse's ``fuse_session_new``.  That
works only when its symbol is in the global scope before pyfuse3's extension
is loaded and bound, hence RTLD_GLOBAL and hence this module is imported
ahead of ``pyfuse3`` wherever the daemon imports it.
"""

from __future__ import annotations

import os
import sys

_flags = sys.getdlopenflags()
sys.setdlopenflags(_flags | os.RTLD_GLOBAL)
try:
    from . import _fuseshim
finally:
    sys.setdlopenflags(_flags)


def active() -> bool:
    """Whether the FUSE session made last went through the shim."""
    return bool(_fuseshim.active())


def set_cache_dirs(on: bool) -> None:
    """Whether directory opens ask the kernel to cache listings (on by default)."""
    _fuseshim.set_cache_dirs(on)


def set_posix_acl(on: bool) -> None:
    """Whether the kernel is asked to enforce POSIX ACLs (on unless ``noacl``)."""
    _fuseshim.set_posix_acl(on)
