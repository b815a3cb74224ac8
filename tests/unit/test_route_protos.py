"""Envoy-YAML dicts → typed protos: loud on typos, deterministic bytes."""

from __future__ import annotations

import itertools

import pytest
from google.protobuf import json_format

from nodemesh.route.inputs import RedirectKey
from nodemesh.route.protos import Cluster, Listener, duration, parse, serialize
from nodemesh.route.resources import cluster, filter_chain, listener

POLICY = {"permissions": [{"any": True}], "principals": [{"any": True}]}


def test_nested_any_maps_serialize_deterministically() -> None:
    # RBAC policies are a map inside an Any inside a map of Anys; json_format packs Anys with
    # a serializer whose map order follows insertion, so `parse` re-packs them.
    keys = ["a", "b", "c", "d", "e"]
    seen = set()
    for perm in itertools.permutations(keys):
        d = cluster("c", False, {k: 1 for k in perm},
                    {"action": "ALLOW", "policies": {k: POLICY for k in perm}})
        seen.add(serialize(parse(d, Cluster)))
    assert len(seen) == 1


def test_typos_fail_loudly() -> None:
    d = listener("l", 15001, RedirectKey("10.0.0.1", 80), [filter_chain("default", "l", "r")], {})
    parse(d, Listener)
    d["filter_chains"][0]["filters"][0]["typed_config"]["use_remote_adress"] = False
    with pytest.raises(json_format.ParseError):
        parse(d, Listener)


@pytest.mark.parametrize(("ms", "text"), [(0, "0s"), (2000, "2s"), (1500, "1.500s"),
                                          (90_000, "90s"), (5, "0.005s")])
def test_duration(ms: int, text: str) -> None:
    assert duration(ms) == text
