"""``python -m pyunionfs`` is the ``pyunionfs`` command."""

import sys

from .cli.commands import main

sys.exit(main())
