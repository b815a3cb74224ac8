"""Shared test setup: unit tests need nothing; integration tests marked `root` need root and the
kernel (namespaces, cgroups, BPF) and are skipped without it. Every other test runs everywhere:
an integration test that needs no root (Envoy on loopback, the conformance runner's pure parts)
is not marked, and fails rather than skips when it breaks."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (namespaces, cgroups, BPF)")
    for item in items:
        if item.get_closest_marker("root") is not None:
            item.add_marker(skip)
