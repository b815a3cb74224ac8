"""Fixtures the unit tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.etcdserver import EtcdServer


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """One real etcd for the session (127.0.0.1, free ports, a temporary data dir); tests keep
    apart by key prefix. Fails, not skips, when etcd is missing (`make setup` installs it)."""
    server = EtcdServer()
    yield server
    server.stop()
