"""Shared test setup: unit tests need nothing; integration tests need root and the kernel."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (namespaces, cgroups, BPF)")
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(skip)
