"""``python -m nodemesh.echo``: run the echo server (or ``client ...``), see :mod:`.server`."""

from __future__ import annotations

import sys

from nodemesh.echo.server import main

if __name__ == "__main__":
    sys.exit(main())
