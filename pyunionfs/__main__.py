"""``python -m pyunionfs`` is the ``pyunionfs`` command."""

from .cli import console

console()
