"""The command lines: ``pyunionfs`` and its subcommands (:mod:`.commands`),
the fuse-overlayfs drop-in form (:mod:`.dropin`) and the demo."""

from .commands import main as main

__all__ = ["main"]
