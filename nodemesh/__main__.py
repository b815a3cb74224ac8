"""`python -m nodemesh` runs the CLI."""

import sys

from nodemesh.cli.main import main

sys.exit(main())
