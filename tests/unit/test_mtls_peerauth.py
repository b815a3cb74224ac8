"""PeerAuthentication → effective mTLS modes: Istio's precedence, age order and inheritance."""

from __future__ import annotations

import dataclasses
import os

import pytest

from nodemesh.model.manifest import load_manifests
from nodemesh.model.validate import validate_objects
from nodemesh.mtls.peerauth import ROOT_NAMESPACE, Mode, WorkloadMode, resolve_modes

STRICT, PERMISSIVE, DISABLE = Mode.STRICT, Mode.PERMISSIVE, Mode.DISABLE
T0 = "2024-05-01T10:00:00Z"
T1 = "2024-05-01T10:00:01Z"
T2 = "2024-05-02T09:00:00Z"
FIXTURE = os.path.join(os.path.dirname(__file__), "manifests", "mutual-tls.yaml")


def pod(name: str, ns: str = "default", **labels: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]}}


def pa(name: str, ns: str = "default", mode: str | None = None, selector: dict | None = None,
       ports: dict | None = None, created: str | None = T0) -> dict:
    spec: dict = {}
    if mode is not None:
        spec["mtls"] = {"mode": mode}
    if selector is not None:
        spec["selector"] = {"matchLabels": selector}
    if ports is not None:
        spec["portLevelMtls"] = {str(p): ({"mode": m} if m else {}) for p, m in ports.items()}
    meta = {"name": name, "namespace": ns, **({"creationTimestamp": created} if created else {})}
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": meta,
            "spec": spec}


def mode_of(pods: list[dict], policies: list[dict], ns: str = "default", name: str = "p",
            **kw: object) -> WorkloadMode:
    return resolve_modes(pods, policies, **kw)[(ns, name)]  # type: ignore[arg-type]


MESH = pa("default", ROOT_NAMESPACE, "PERMISSIVE")


# -- no policies -----------------------------------------------------------------------------


def test_empty_inputs() -> None:
    assert resolve_modes([], []) == {}
    assert resolve_modes([], [MESH, pa("x", mode="DISABLE")]) == {}


def test_without_policies_every_pod_gets_the_default() -> None:
    pods = [pod("a"), pod("b", "prod", app="web"), pod("c", ROOT_NAMESPACE)]
    assert resolve_modes(pods, []) == {("default", "a"): WorkloadMode(STRICT),
                                       ("prod", "b"): WorkloadMode(STRICT),
                                       (ROOT_NAMESPACE, "c"): WorkloadMode(STRICT)}
    assert set(resolve_modes(pods, [], default=PERMISSIVE).values()) == {WorkloadMode(PERMISSIVE)}


def test_pod_without_namespace_or_labels() -> None:
    p = {"metadata": {"name": "p"}}
    assert resolve_modes([p], [pa("ns", "default", "DISABLE")]) == {
        ("default", "p"): WorkloadMode(DISABLE)}


# -- precedence: workload > namespace > mesh > default ---------------------------------------


def test_mesh_wide_policy_applies_to_every_namespace() -> None:
    pods = [pod("a"), pod("b", "prod"), pod("c", ROOT_NAMESPACE)]
    assert set(resolve_modes(pods, [MESH]).values()) == {WorkloadMode(PERMISSIVE)}


def test_namespace_wide_beats_mesh_wide_in_its_namespace_only() -> None:
    pods = [pod("p", "prod"), pod("p", "dev")]
    out = resolve_modes(pods, [MESH, pa("default", "prod", "DISABLE")])
    assert out[("prod", "p")] == WorkloadMode(DISABLE)
    assert out[("dev", "p")] == WorkloadMode(PERMISSIVE)


def test_namespace_wide_beats_the_default() -> None:
    assert mode_of([pod("p")], [pa("default", mode="PERMISSIVE")]).mode == PERMISSIVE


def test_workload_beats_namespace_and_mesh() -> None:
    pods = [pod("p", app="web"), pod("q", app="db")]
    policies = [MESH, pa("ns", mode="DISABLE"), pa("web", mode="STRICT", selector={"app": "web"})]
    out = resolve_modes(pods, policies)
    assert out[("default", "p")] == WorkloadMode(STRICT)
    assert out[("default", "q")] == WorkloadMode(DISABLE)  # not selected: the namespace's mode


def test_workload_beats_mesh_without_namespace_policy() -> None:
    policies = [MESH, pa("web", mode="DISABLE", selector={"app": "web"})]
    assert mode_of([pod("p", app="web")], policies).mode == DISABLE


def test_selector_needs_every_label() -> None:
    policies = [pa("web", mode="DISABLE", selector={"app": "web", "tier": "front"})]
    out = resolve_modes([pod("p", app="web"), pod("q", app="web", tier="front", v="2"),
                         pod("r", app="web", tier="back")], policies)
    assert out[("default", "p")].mode == STRICT
    assert out[("default", "q")].mode == DISABLE
    assert out[("default", "r")].mode == STRICT


def test_policies_of_other_namespaces_do_not_apply() -> None:
    policies = [pa("ns", "prod", "DISABLE"),
                pa("web", "prod", "PERMISSIVE", selector={"app": "web"})]
    out = resolve_modes([pod("p", "dev", app="web"), pod("p", "prod", app="web")], policies)
    assert out[("dev", "p")] == WorkloadMode(STRICT)
    assert out[("prod", "p")] == WorkloadMode(PERMISSIVE)


def test_selector_without_labels_is_namespace_wide() -> None:
    # Istio: no matchLabels (or an empty selector) selects like no selector at all.
    empty_labels = pa("a", mode="DISABLE", selector={})
    empty_selector = pa("b", mode="DISABLE")
    empty_selector["spec"]["selector"] = {}
    for policy in (empty_labels, empty_selector):
        out = resolve_modes([pod("p", app="web"), pod("q", "other")], [policy])
        assert out == {("default", "p"): WorkloadMode(DISABLE), ("other", "q"): WorkloadMode(STRICT)}
    in_root = pa("mesh", ROOT_NAMESPACE, "DISABLE", selector={})
    assert mode_of([pod("p", "other")], [in_root], "other").mode == DISABLE


# -- the root namespace ----------------------------------------------------------------------


def test_selector_in_root_namespace_applies_to_no_pod() -> None:
    # Istio ignores workload selectors in the root namespace (validation refuses them): not for
    # pods elsewhere, nor for the root namespace's own pods.
    policy = pa("web", ROOT_NAMESPACE, "DISABLE", selector={"app": "web"})
    pods = [pod("p", "prod", app="web"), pod("p", ROOT_NAMESPACE, app="web")]
    assert set(resolve_modes(pods, [policy]).values()) == {WorkloadMode(STRICT)}
    assert set(resolve_modes(pods, [policy, MESH]).values()) == {WorkloadMode(PERMISSIVE)}


def test_root_namespace_policy_is_the_mesh_level_for_its_own_pods() -> None:
    # In the root namespace, a policy without selector is both mesh- and namespace-wide: one level.
    older_unset = pa("a", ROOT_NAMESPACE, "UNSET", created=T0)
    newer = pa("b", ROOT_NAMESPACE, "DISABLE", created=T1)
    out = resolve_modes([pod("p", ROOT_NAMESPACE), pod("p", "prod")], [older_unset, newer])
    # The oldest (UNSET) is the mesh policy: the newer one is not a namespace level below it.
    assert out[(ROOT_NAMESPACE, "p")] == WorkloadMode(STRICT)
    assert out[("prod", "p")] == WorkloadMode(STRICT)


def test_another_root_namespace() -> None:
    policies = [pa("default", "istio-system", "DISABLE"), pa("x", ROOT_NAMESPACE, "PERMISSIVE")]
    out = resolve_modes([pod("p", "prod"), pod("p", ROOT_NAMESPACE)], policies,
                        root_namespace="istio-system")
    assert out[("prod", "p")].mode == DISABLE
    # nodemesh-system is an ordinary namespace then.
    assert out[(ROOT_NAMESPACE, "p")].mode == PERMISSIVE


# -- several policies of one level: the oldest wins ------------------------------------------


@pytest.mark.parametrize("reverse", [False, True], ids=["oldest-first", "newest-first"])
def test_oldest_mesh_policy_wins(reverse: bool) -> None:
    policies = [pa("z-old", ROOT_NAMESPACE, "DISABLE", created=T0),
                pa("a-new", ROOT_NAMESPACE, "PERMISSIVE", created=T2)]
    got = mode_of([pod("p")], policies[::-1] if reverse else policies)
    assert got.mode == DISABLE


@pytest.mark.parametrize("reverse", [False, True], ids=["oldest-first", "newest-first"])
def test_oldest_namespace_policy_wins(reverse: bool) -> None:
    policies = [pa("new", mode="PERMISSIVE", created=T1), pa("old", mode="DISABLE", created=T0)]
    assert mode_of([pod("p")], policies[::-1] if reverse else policies).mode == DISABLE


@pytest.mark.parametrize("reverse", [False, True], ids=["oldest-first", "newest-first"])
def test_oldest_matching_workload_policy_wins_with_its_ports(reverse: bool) -> None:
    old = pa("old", mode="PERMISSIVE", selector={"app": "web"}, ports={8080: "DISABLE"},
             created=T0)
    new = pa("new", mode="DISABLE", selector={"tier": "front"}, ports={9090: "STRICT"},
             created=T2)
    policies = [old, new][::-1] if reverse else [old, new]
    got = mode_of([pod("p", app="web", tier="front")], policies)
    # Port-level settings are not merged across policies: only the chosen one's count.
    assert got == WorkloadMode(PERMISSIVE, {8080: DISABLE})


def test_an_older_policy_that_does_not_match_does_not_hide_a_newer_one() -> None:
    policies = [pa("old", mode="PERMISSIVE", selector={"app": "db"}, created=T0),
                pa("new", mode="DISABLE", selector={"app": "web"}, created=T2)]
    assert mode_of([pod("p", app="web")], policies).mode == DISABLE


def test_same_timestamp_then_name_decides() -> None:
    policies = [pa("b", mode="DISABLE", created=T0), pa("a", mode="PERMISSIVE", created=T0)]
    assert mode_of([pod("p")], policies).mode == PERMISSIVE
    assert mode_of([pod("p")], policies[::-1]).mode == PERMISSIVE


def test_timestamps_compare_as_instants() -> None:
    # 10:30+01:00 is 09:30Z: older than 10:00Z, though it sorts after it as text.
    policies = [pa("utc", mode="DISABLE", created="2024-05-01T10:00:00Z"),
                pa("cet", mode="PERMISSIVE", created="2024-05-01T10:30:00+01:00")]
    assert mode_of([pod("p")], policies).mode == PERMISSIVE
    fractional = [pa("a", mode="DISABLE", created="2024-05-01T10:00:00.5Z"),
                  pa("b", mode="PERMISSIVE", created="2024-05-01T10:00:00.25Z")]
    assert mode_of([pod("p")], fractional).mode == PERMISSIVE


def test_a_policy_without_timestamp_counts_as_the_newest() -> None:
    policies = [pa("a", mode="DISABLE", created=None), pa("b", mode="PERMISSIVE", created=T2)]
    assert mode_of([pod("p")], policies).mode == PERMISSIVE
    unreadable = [pa("a", mode="DISABLE", created="yesterday"), pa("b", mode="PERMISSIVE")]
    assert mode_of([pod("p")], unreadable).mode == PERMISSIVE
    # Among policies without one, the name decides.
    both = [pa("b", mode="DISABLE", created=None), pa("a", mode="PERMISSIVE", created=None)]
    assert mode_of([pod("p")], both).mode == PERMISSIVE


# -- UNSET inherits from the broader level ---------------------------------------------------


def test_unset_mesh_policy_keeps_the_default() -> None:
    policies = [pa("default", ROOT_NAMESPACE, "UNSET")]
    assert mode_of([pod("p")], policies).mode == STRICT
    assert mode_of([pod("p")], policies, default=DISABLE).mode == DISABLE


def test_unset_namespace_policy_inherits_the_mesh_mode() -> None:
    assert mode_of([pod("p")], [MESH, pa("ns", mode="UNSET")]).mode == PERMISSIVE
    assert mode_of([pod("p")], [pa("ns", mode="UNSET")]).mode == STRICT


def test_unset_workload_policy_inherits_namespace_then_mesh_then_default() -> None:
    web = pa("web", mode="UNSET", selector={"app": "web"})
    p = [pod("p", app="web")]
    assert mode_of(p, [MESH, pa("ns", mode="DISABLE"), web]).mode == DISABLE
    assert mode_of(p, [MESH, web]).mode == PERMISSIVE
    assert mode_of(p, [web]).mode == STRICT
    assert mode_of(p, [web], default=PERMISSIVE).mode == PERMISSIVE


def test_absent_mtls_is_unset() -> None:
    # Objects as Istio users write them may leave mtls out (validation fills mode: UNSET).
    assert mode_of([pod("p")], [MESH, pa("ns")]).mode == PERMISSIVE
    no_spec = {"kind": "PeerAuthentication", "metadata": {"name": "ns", "namespace": "default"}}
    assert mode_of([pod("p")], [MESH, no_spec]).mode == PERMISSIVE


def test_an_unset_oldest_policy_still_wins_its_level() -> None:
    # As in Istio: the oldest policy of a level is chosen first, then UNSET defers upward; a
    # newer policy of the same level with a mode does not step in.
    policies = [pa("old", mode="UNSET", created=T0), pa("new", mode="DISABLE", created=T2)]
    assert mode_of([pod("p")], [MESH, *policies]).mode == PERMISSIVE


# -- port-level modes ------------------------------------------------------------------------


def test_port_level_overrides() -> None:
    web = pa("web", mode="STRICT", selector={"app": "web"},
             ports={8080: "DISABLE", 9090: "PERMISSIVE", 443: "STRICT"})
    got = mode_of([pod("p", app="web")], [pa("ns", mode="DISABLE"), web])
    assert got == WorkloadMode(STRICT, {8080: DISABLE, 9090: PERMISSIVE, 443: STRICT})
    assert (got.for_port(8080), got.for_port(9090), got.for_port(443), got.for_port(80)) == (
        DISABLE, PERMISSIVE, STRICT, STRICT)


def test_port_level_unset_takes_the_workload_mode() -> None:
    web = pa("web", mode="PERMISSIVE", selector={"app": "web"}, ports={8080: "UNSET", 9090: None})
    got = mode_of([pod("p", app="web")], [web])
    assert got == WorkloadMode(PERMISSIVE, {8080: PERMISSIVE, 9090: PERMISSIVE})


def test_port_level_unset_under_an_unset_workload_takes_the_inherited_mode() -> None:
    web = pa("web", mode="UNSET", selector={"app": "web"}, ports={8080: "UNSET", 9090: "STRICT"})
    got = mode_of([pod("p", app="web")], [MESH, pa("ns", mode="DISABLE"), web])
    assert got == WorkloadMode(DISABLE, {8080: DISABLE, 9090: STRICT})
    assert got.for_port(1) == DISABLE


def test_port_keys_as_stored_strings_or_yaml_numbers() -> None:
    web = pa("web", mode="STRICT", selector={"app": "web"})
    web["spec"]["portLevelMtls"] = {"8080": {"mode": "DISABLE"}, 9090: {"mode": "PERMISSIVE"}}
    got = mode_of([pod("p", app="web")], [web])
    assert dict(got.ports) == {8080: DISABLE, 9090: PERMISSIVE}


def test_ports_apply_only_to_the_selected_pods() -> None:
    web = pa("web", mode="UNSET", selector={"app": "web"}, ports={8080: "DISABLE"})
    out = resolve_modes([pod("p", app="web"), pod("q", app="db")], [web])
    assert out[("default", "q")] == WorkloadMode(STRICT)
    assert out[("default", "q")].for_port(8080) == STRICT
    assert out[("default", "p")].for_port(8080) == DISABLE


# -- the result type and bad input -----------------------------------------------------------


def test_workload_mode_is_a_read_only_value() -> None:
    ports = {8080: DISABLE}
    wm = WorkloadMode(STRICT, ports)
    ports[9090] = PERMISSIVE  # the caller's dict is copied
    assert dict(wm.ports) == {8080: DISABLE}
    with pytest.raises(TypeError):
        wm.ports[1] = STRICT  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        wm.mode = PERMISSIVE  # type: ignore[misc]
    assert wm == WorkloadMode(STRICT, {8080: DISABLE})
    assert hash(wm) == hash(WorkloadMode(STRICT, {8080: DISABLE}))
    assert wm != WorkloadMode(STRICT)
    assert WorkloadMode(PERMISSIVE).ports == {}


def test_mode_is_a_string() -> None:
    assert Mode.STRICT == "STRICT" and str(Mode.DISABLE) == "DISABLE"
    assert [m.value for m in Mode] == ["STRICT", "PERMISSIVE", "DISABLE"]
    assert mode_of([pod("p")], [], default="PERMISSIVE").mode is PERMISSIVE  # type: ignore[arg-type]


def test_invalid_modes_and_ports_name_the_policy() -> None:
    with pytest.raises(ValueError, match=r"PeerAuthentication default/x: spec\.mtls\.mode: "
                                         r"unknown mTLS mode 'strict'"):
        resolve_modes([], [pa("x", mode="strict")])
    with pytest.raises(ValueError, match=r"PeerAuthentication prod/y: spec\.portLevelMtls\[8080\]"
                                         r"\.mode: unknown mTLS mode 'OFF'"):
        resolve_modes([], [pa("y", "prod", selector={"a": "b"}, ports={8080: "OFF"})])
    for key in ("http", "0", 70000, True):
        bad = pa("z", selector={"a": "b"})
        bad["spec"]["portLevelMtls"] = {key: {}}
        with pytest.raises(ValueError, match=r"PeerAuthentication default/z: spec\.portLevelMtls"):
            resolve_modes([], [bad])


# -- together with the model: validated objects go straight in -------------------------------


def test_validated_fixture_policies() -> None:
    with open(FIXTURE) as f:
        objs = validate_objects(load_manifests(f.read(), FIXTURE), FIXTURE)
    policies = [o for o in objs if o["kind"] == "PeerAuthentication"]
    pods = [pod("finance", "foo", app="finance"), pod("ledger", "foo", app="ledger"),
            pod("web", "foo", app="web"), pod("web", "bar", app="finance")]
    assert resolve_modes(pods, policies) == {
        ("foo", "finance"): WorkloadMode(STRICT, {8080: DISABLE}),
        ("foo", "ledger"): WorkloadMode(PERMISSIVE, {8080: DISABLE}),  # UNSET: the namespace's
        ("foo", "web"): WorkloadMode(PERMISSIVE),
        ("bar", "web"): WorkloadMode(STRICT),  # the mesh-wide policy
    }
