"""``python -m pyunionfs`` is the ``pyunionfs`` command."""

import sys

from .cli import main

sys.exit(main())
