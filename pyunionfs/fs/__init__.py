"""The union filesystem without FUSE: layers, resolution, caches, inodes,
the read side (:mod:`.union`) and the write side (:mod:`.writes`, assembled
from :mod:`.creates`, :mod:`.openfiles`, :mod:`.removes`, :mod:`.attributes`
over :mod:`.writable`); the on-disk marker formats, for all of them and for
:mod:`pyunionfs.image`, in :mod:`.markers` alone.

Nothing here imports from :mod:`pyunionfs.fuse`, :mod:`pyunionfs.image` or
:mod:`pyunionfs.cli`; ``tests/unit/test_imports.py`` keeps it so.
"""
