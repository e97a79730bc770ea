"""The daemon's garbage-collector settings (``pyunionfs.fuse.mount._tune_gc``).

Run in a fresh interpreter each, so this process's collector is left as it is.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from pyunionfs.fuse.mount import GC_THRESHOLDS


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_what_exists_before_serving_is_frozen_and_collections_come_in_larger_batches() -> None:
    out = _run(
        """
        import gc
        from pyunionfs.fuse.mount import _tune_gc
        _tune_gc()
        print(gc.get_freeze_count() > 1000, gc.get_threshold())
        """
    )
    assert out == f"True {GC_THRESHOLDS}"
    assert GC_THRESHOLDS[0] > 700  # CPython's default, which walks the node table too often


def test_garbage_cycles_are_still_collected() -> None:
    out = _run(
        """
        import weakref
        from pyunionfs.fuse.mount import GC_THRESHOLDS, _tune_gc
        _tune_gc()

        class Cycle:
            pass

        refs = []
        for _ in range(3):
            a, b = Cycle(), Cycle()
            a.other, b.other = b, a
            refs.append(weakref.ref(a))
            del a, b
        kept = [[] for _ in range(3 * GC_THRESHOLDS[0])]  # objects that live on, as nodes do
        print(sum(r() is not None for r in refs))
        """
    )
    assert out == "0"
