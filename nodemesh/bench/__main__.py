"""``python -m nodemesh.bench [--quick] [--out DIR] ...``: run the benchmark."""

from __future__ import annotations

import sys

from nodemesh.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
