"""The union filesystem without FUSE: layers, resolution, caches, inodes,
the read side (:mod:`.union`) and the write side (:mod:`.writes`).

Nothing here imports from :mod:`pyunionfs.fuse`, :mod:`pyunionfs.image` or
:mod:`pyunionfs.cli`; ``tests/unit/test_imports.py`` keeps it so.
"""
