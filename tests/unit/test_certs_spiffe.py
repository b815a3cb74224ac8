"""SPIFFE IDs of workload identities: building, parsing, and refusing what is not one."""

from __future__ import annotations

import re

import pytest

from nodemesh.certs.spiffe import (
    DEFAULT_TRUST_DOMAIN,
    check_path_segment,
    check_trust_domain,
    parse_workload_id,
    spiffe_id,
    trust_domain_id,
)


def test_spiffe_id_is_namespace_and_service_account_under_the_trust_domain() -> None:
    assert DEFAULT_TRUST_DOMAIN == "cluster.local"
    assert spiffe_id(DEFAULT_TRUST_DOMAIN, "prod", "api") == "spiffe://cluster.local/ns/prod/sa/api"
    assert spiffe_id("example.org", "kube-system", "coredns") == "spiffe://example.org/ns/kube-system/sa/coredns"


def test_trust_domain_id_is_the_bare_trust_domain() -> None:
    assert trust_domain_id("cluster.local") == "spiffe://cluster.local"


@pytest.mark.parametrize(("td", "ns", "sa", "message"), [
    ("Cluster.local", "prod", "api", "trust domain 'Cluster.local': character 'C' is not allowed"),
    ("", "prod", "api", "trust domain '': must not be empty"),
    ("cluster.local", "", "api", "namespace '': must not be empty"),
    ("cluster.local", "prod", "", "service account '': must not be empty"),
    ("cluster.local", "a/b", "api", "namespace 'a/b': character '/' is not allowed"),
    ("cluster.local", "prod", "..", "service account '..': must not be '..'"),
    ("cluster.local", "prod", "a%20b", "service account 'a%20b': character '%' is not allowed"),
])
def test_spiffe_id_refuses_bad_parts_naming_them(td: str, ns: str, sa: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        spiffe_id(td, ns, sa)


@pytest.mark.parametrize("uri", [
    "spiffe://cluster.local/ns/prod/sa/api",
    "spiffe://example.org/ns/kube-system/sa/default",
    "spiffe://my_td-1.example/ns/A.b_c-d/sa/Upper_Case.ok",
])
def test_parse_workload_id_inverts_spiffe_id(uri: str) -> None:
    td, ns, sa = parse_workload_id(uri)
    assert spiffe_id(td, ns, sa) == uri


def test_parse_workload_id_returns_the_parts() -> None:
    assert parse_workload_id("spiffe://cluster.local/ns/prod/sa/api") == ("cluster.local", "prod", "api")


@pytest.mark.parametrize(("uri", "message"), [
    ("", "is not a SPIFFE ID: must start with spiffe://"),
    ("http://cluster.local/ns/a/sa/b", "is not a SPIFFE ID: must start with spiffe://"),
    ("SPIFFE://cluster.local/ns/a/sa/b", "is not a SPIFFE ID: must start with spiffe://"),
    ("spiffe:/cluster.local/ns/a/sa/b", "is not a SPIFFE ID: must start with spiffe://"),
    ("spiffe://", "trust domain '': must not be empty"),
    ("spiffe:///ns/a/sa/b", "trust domain '': must not be empty"),
    ("spiffe://Cluster.local/ns/a/sa/b", "trust domain 'Cluster.local': character 'C'"),
    ("spiffe://cluster.local:8080/ns/a/sa/b", "trust domain 'cluster.local:8080': character ':'"),
    ("spiffe://user@cluster.local/ns/a/sa/b", "character '@'"),
    ("spiffe://cluster.local", "is not a workload identity"),
    ("spiffe://cluster.local/", "path segment '': must not be empty"),
    ("spiffe://cluster.local/ns/a", "is not a workload identity"),
    ("spiffe://cluster.local/ns/a/sa/b/c", "is not a workload identity"),
    ("spiffe://cluster.local/sa/b/ns/a", "is not a workload identity"),
    ("spiffe://cluster.local/workload/x", "is not a workload identity"),
    ("spiffe://cluster.local/ns//sa/b", "path segment '': must not be empty"),
    ("spiffe://cluster.local/ns/a/sa/b/", "path segment '': must not be empty"),
    ("spiffe://cluster.local/ns/./sa/b", "path segment '.': must not be '.'"),
    ("spiffe://cluster.local/ns/a/sa/b?x=1", "character '?'"),
    ("spiffe://cluster.local/ns/a/sa/b#frag", "character '#'"),
    ("spiffe://cluster.local/ns/%61/sa/b", "character '%'"),
    ("spiffe://cluster.local/ns/a b/sa/b", "character ' '"),
])
def test_parse_workload_id_refuses_anything_else_with_a_clear_message(uri: str, message: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_workload_id(uri)
    assert message in str(e.value)
    assert repr(uri) in str(e.value)  # the message names the ID it refuses


def test_parse_workload_id_refuses_overlong_ids_and_non_strings() -> None:
    with pytest.raises(ValueError, match="longer than 2048 bytes"):
        parse_workload_id("spiffe://cluster.local/ns/a/sa/" + "b" * 2048)
    with pytest.raises(ValueError, match="want a string"):
        parse_workload_id(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("td", ["cluster.local", "a", "my_td-1.example", "0", "x" * 255])
def test_check_trust_domain_accepts_valid_names(td: str) -> None:
    assert check_trust_domain(td) is None


@pytest.mark.parametrize(("td", "reason"), [
    ("", "must not be empty"),
    ("x" * 256, "must be at most 255 characters, got 256"),
    ("Cluster.local", "character 'C' is not allowed"),
    ("cluster.local:443", "character ':' is not allowed"),
    ("a/b", "character '/' is not allowed"),
    ("été", "character 'é' is not allowed"),
    ("a b", "character ' ' is not allowed"),
])
def test_check_trust_domain_says_why_not(td: str, reason: str) -> None:
    got = check_trust_domain(td)
    assert got is not None and got.startswith(reason)


@pytest.mark.parametrize(("segment", "ok"), [
    ("prod", True), ("A-b_c.d", True), ("...", True), ("", False), (".", False), ("..", False),
    ("a:b", False), ("a/b", False),
])
def test_check_path_segment(segment: str, ok: bool) -> None:
    assert (check_path_segment(segment) is None) is ok
