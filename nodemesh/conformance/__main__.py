"""``python -m nodemesh.conformance``: see :mod:`nodemesh.conformance.runner`."""

from __future__ import annotations

import sys

from nodemesh.conformance.runner import main

if __name__ == "__main__":
    sys.exit(main())
