"""`nodemesh bench`: no mesh, the sidecar model, nodemesh L4 and nodemesh L7, side by side.

`main(argv)` runs the whole benchmark (see `nodemesh.bench.run`); the modules `loadgen` and
`poller` also run on their own inside client pods, so this package imports nothing at load time.
"""

from __future__ import annotations


def main(argv: list[str]) -> int:
    """Run the benchmark with command-line arguments `argv` (without the program name)."""
    from nodemesh.bench.run import main as run_main

    return run_main(argv)
