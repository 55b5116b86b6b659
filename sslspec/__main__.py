"""Run the ``sslspec`` command with ``python -m sslspec``."""

import sys

from .cli import main

sys.exit(main())
