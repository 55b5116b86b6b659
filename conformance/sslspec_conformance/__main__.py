"""Run the conformance suite: ``python -m sslspec_conformance BACKEND [options]``."""

import sys

from sslspec_conformance.cli import main

sys.exit(main())
