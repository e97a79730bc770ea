"""The command lines: ``pyunionfs`` and its subcommands (:mod:`.commands`),
the fuse-overlayfs drop-in form (:mod:`.dropin`) and the demo."""

from __future__ import annotations

import logging
import os
import sys

from .commands import main as main

__all__ = ["console", "main"]


def console() -> None:
    """The ``pyunionfs`` program: :func:`main`, then exit without the interpreter's teardown.

    Why: container tools run ``pyunionfs`` once per build step and per
    container start, and waits for it to exit; freeing every module and
    object at exit cost about 13 ms of a 200 ms mount.  Nothing of ours
    needs it: files are closed by their ``with`` blocks and the background
    daemon is another process.  What is buffered is flushed first.
    """
    status = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: the reader is gone
            status = status or 1
    os._exit(status)
