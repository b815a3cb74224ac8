"""Errors that reach the user: each carries the message to print and the exit code to use."""

from __future__ import annotations


class NodemeshError(Exception):
    """An error with a message meant for the user and a process exit code."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code

    @property
    def message(self) -> str:
        return str(self)


class InvalidManifest(NodemeshError):
    """One or more manifests failed validation; nothing from the apply was stored.

    `errors` holds one line per problem, each naming the resource and the field, e.g.
    ``Service default/web: spec.ports[0].port: must be 1-65535``.
    """

    exit_code = 2

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(f"error: {e}" for e in self.errors), 2)


class NotFound(NodemeshError):
    exit_code = 1


class Conflict(NodemeshError):
    """A write lost a race (resourceVersion mismatch) or an object already exists."""

    exit_code = 1


class NoCluster(NodemeshError):
    def __init__(self, state_dir: str) -> None:
        super().__init__(f"no cluster in {state_dir}: run `nodemesh up`", 1)
