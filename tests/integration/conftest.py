"""Fixtures for integration tests: real clusters, torn down and checked for leftovers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.clusterharness import Cluster, new_cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A 2-node cluster shared by the tests of one module."""
    c = new_cluster(nodes=2)
    try:
        yield c
    finally:
        c.down()
        left = c.leftovers()
        assert not left, f"cluster {c.name} left things behind: {left}"
