"""The kind registry: names the CLI resolves, who may write each kind, and that every kind can be
stored, listed and described (the CLI's get and describe iterate KINDS)."""

from __future__ import annotations

import io

import pytest

from nodemesh.cli import output
from nodemesh.cli.describe import describe
from nodemesh.model.kinds import KINDS, resolve_kind
from nodemesh.model.validate import SCHEMAS, USER_KINDS
from nodemesh.store.sqlite import SqliteStore


@pytest.mark.parametrize(("typed", "kind"), [
    ("sa", "ServiceAccount"), ("serviceaccounts", "ServiceAccount"),
    ("serviceaccount", "ServiceAccount"), ("ServiceAccount", "ServiceAccount"),
    ("pa", "PeerAuthentication"), ("peerauthentications", "PeerAuthentication"),
    ("peerauthentication", "PeerAuthentication"), ("PeerAuthentication", "PeerAuthentication"),
    ("trustbundles", "TrustBundle"), ("trustbundle", "TrustBundle"),
    ("id", "Identity"), ("cnp", "CiliumNetworkPolicy"), ("svc", "Service"),
])
def test_cli_names_resolve(typed: str, kind: str) -> None:
    info = resolve_kind(typed)
    assert info is not None and info.kind == kind


def test_no_two_kinds_share_a_cli_name() -> None:
    names: dict[str, str] = {}
    for info in KINDS.values():
        for n in {info.kind.lower(), info.plural, info.plural.rstrip("s"), *info.short_names}:
            assert names.setdefault(n, info.kind) == info.kind, n


def test_registry_entries_of_the_mutual_tls_kinds() -> None:
    sa, pa, tb = KINDS["ServiceAccount"], KINDS["PeerAuthentication"], KINDS["TrustBundle"]
    assert (sa.api_version, sa.namespaced, sa.user_writable) == ("v1", True, True)
    assert pa.api_versions == ("security.istio.io/v1", "security.istio.io/v1beta1")
    assert (pa.namespaced, pa.user_writable) == (True, True)
    assert (tb.api_version, tb.namespaced, tb.user_writable) == ("nodemesh.io/v1", False, False)
    assert KINDS["Service"].api_versions == ("v1",)


def test_every_user_kind_has_a_schema_and_no_other_kind_has_one() -> None:
    assert set(SCHEMAS) == set(USER_KINDS)
    assert "TrustBundle" not in USER_KINDS and "Identity" not in USER_KINDS


def _minimal(kind: str) -> dict:
    info = KINDS[kind]
    meta = {"name": "x", **({"namespace": "default"} if info.namespaced else {})}
    obj: dict = {"apiVersion": info.api_version, "kind": kind, "metadata": meta}
    if kind != "ServiceAccount":
        obj["spec"] = {}
    if kind == "TrustBundle":
        obj["spec"] = {"roots": ["-----BEGIN CERTIFICATE-----\n..."]}
    return obj


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_can_be_stored_listed_and_described(kind: str, tmp_path) -> None:
    store = SqliteStore(str(tmp_path / "store.db"))
    with store.transaction() as t:
        t.put(_minimal(kind))
    info = KINDS[kind]
    [obj] = store.list(kind, "default" if info.namespaced else None)
    for fmt in (None, "wide", "yaml", "json", "name"):
        out = io.StringIO()
        output.print_objects([obj], kind, fmt, True, info.namespaced, out=out)
        assert out.getvalue()
    assert "Name:" in describe(obj, store)
