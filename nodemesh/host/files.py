"""State files: JSON written atomically (readers see the old file or the new one) and read back."""

from __future__ import annotations

import json
import os


def write_json_atomic(path: str, data: object, mode: int = 0o600) -> None:
    """Write JSON so that readers see the old or the new file, never half of one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
