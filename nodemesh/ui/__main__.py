"""`python -m nodemesh.ui` runs the service map server (as `nodemesh ui` does)."""

import sys

from nodemesh.ui.server import main

sys.exit(main(sys.argv[1:]))
