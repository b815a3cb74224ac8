"""Fixtures for integration tests: real clusters, torn down and checked for leftovers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.clusterharness import Cluster, running_cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A 2-node cluster shared by the tests of one module."""
    with running_cluster(2) as c:
        yield c
