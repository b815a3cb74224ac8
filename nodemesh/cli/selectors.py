"""kubectl's label-selector syntax (`-l app=web,tier!=db,!canary,env in (a,b)`).

The parser lives with the selector matcher in `nodemesh.model.labels` (the flow filters use it
too, below the CLI); this name stays for the commands.
"""

from __future__ import annotations

from nodemesh.model.labels import parse_selector

__all__ = ["parse_selector"]
