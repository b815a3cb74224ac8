"""Valid manifests are accepted unchanged, with Kubernetes' defaults filled in."""

from __future__ import annotations

import copy
import glob
import os
import textwrap

import pytest

from nodemesh.errors import InvalidManifest
from nodemesh.model.admission import admit
from nodemesh.model.manifest import load_manifests
from nodemesh.model.validate import validate_objects

HERE = os.path.dirname(__file__)
FIXTURES = os.path.join(HERE, "manifests")
# shared/ lies beside the repository (in CI too); /work/shared on developers' machines.
CONFORMANCE = next(
    (d for d in (os.path.normpath(os.path.join(HERE, "..", "..", "..", "shared")), "/work/shared")
     if os.path.isdir(d)),
    "/work/shared",
) + "/conformance/gateway-api-mesh"


def load(path: str, namespace: str = "default") -> list[dict]:
    with open(path) as f:
        return validate_objects(load_manifests(f.read(), path), path, namespace)


def one(text: str) -> dict:
    [obj] = validate_objects(load_manifests(textwrap.dedent(text), "t.yaml"), "t.yaml")
    return obj


def conformance_files() -> list[str]:
    files = [os.path.join(CONFORMANCE, "manifests.yaml"),
             *sorted(glob.glob(os.path.join(CONFORMANCE, "tests", "*.yaml")))]
    return [f for f in files if os.path.exists(f)]


@pytest.mark.skipif(not os.path.isdir(CONFORMANCE), reason="no shared conformance data")
@pytest.mark.parametrize("path", conformance_files(), ids=os.path.basename)
def test_gateway_api_mesh_conformance_manifests_validate(path: str) -> None:
    assert load(path)


@pytest.mark.skipif(not os.path.isdir(CONFORMANCE), reason="no shared conformance data")
def test_conformance_manifests_pass_admission_together() -> None:
    store: list[dict] = []

    def existing(kind: str, ns: str | None) -> list[dict]:
        return [o for o in store if o["kind"] == kind
                and (ns is None or o["metadata"].get("namespace") == ns)]

    for path in conformance_files():
        for obj in admit(load(path), existing):
            key = (obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])
            store[:] = [o for o in store if (o["kind"], o["metadata"].get("namespace"),
                                             o["metadata"]["name"]) != key]
            store.append(obj)
    ips = [o["spec"]["clusterIP"] for o in store if o["kind"] == "Service"]
    assert len(ips) == len(set(ips)) == 3


@pytest.mark.parametrize("name", sorted(os.listdir(FIXTURES)))
def test_fixture_manifests_validate(name: str) -> None:
    assert load(os.path.join(FIXTURES, name))


def _strip_defaults(user: object, out: object) -> object:
    """`out` restricted to what `user` wrote: every field the user wrote must come back as is."""
    if isinstance(user, dict) and isinstance(out, dict):
        return {k: _strip_defaults(v, out.get(k)) for k, v in user.items() if k in out}
    if isinstance(user, list) and isinstance(out, list):
        return [_strip_defaults(u, o) for u, o in zip(user, out, strict=False)]
    return out


@pytest.mark.parametrize("name", ["web-app.yaml", "networkpolicy-docs.yaml",
                                  "cilium-policies.yaml"])
def test_user_fields_come_back_unchanged(name: str) -> None:
    path = os.path.join(FIXTURES, name)
    with open(path) as f:
        raw = load_manifests(f.read(), path)
    out = validate_objects(copy.deepcopy(raw), path)
    for user, obj in zip(raw, out, strict=True):
        user_meta = dict(user["metadata"])
        user_meta.setdefault("namespace", obj["metadata"].get("namespace"))
        if obj["kind"] == "Namespace":
            user_meta.pop("namespace")
        expected = {**user, "metadata": user_meta}
        assert _strip_defaults(expected, obj) == expected


def test_validation_does_not_modify_its_input() -> None:
    path = os.path.join(FIXTURES, "web-app.yaml")
    with open(path) as f:
        raw = load_manifests(f.read(), path)
    before = copy.deepcopy(raw)
    validate_objects(raw, path)
    assert raw == before


def test_store_owned_metadata_and_status_are_dropped() -> None:
    dep, svc = load(os.path.join(FIXTURES, "kubectl-export.yaml"))
    assert "status" not in dep and "status" not in svc
    for key in ("uid", "resourceVersion", "generation", "creationTimestamp", "managedFields"):
        assert key not in dep["metadata"]
    assert "creationTimestamp" not in dep["spec"]["template"]["metadata"]
    assert dep["metadata"]["annotations"] == {"deployment.kubernetes.io/revision": "1"}
    assert svc["spec"]["clusterIP"] == "10.96.12.7"


def test_namespace_defaults_and_cluster_scoped_objects() -> None:
    text = textwrap.dedent("""\
        apiVersion: v1
        kind: Namespace
        metadata:
          name: prod
          namespace: ignored
        ---
        apiVersion: v1
        kind: Service
        metadata:
          name: a
        spec:
          ports: [{port: 80}]
        ---
        apiVersion: v1
        kind: Service
        metadata:
          name: b
          namespace: other
        spec:
          ports: [{port: 80}]
        """)
    ns, a, b = validate_objects(load_manifests(text, "t.yaml"), "t.yaml")
    assert "namespace" not in ns["metadata"]
    assert a["metadata"]["namespace"] == "default"
    assert b["metadata"]["namespace"] == "other"
    [c] = validate_objects(load_manifests(text, "t.yaml")[1:2], "t.yaml", "prod")
    assert c["metadata"]["namespace"] == "prod"
    # Without -n, "default" does not conflict with a document's own namespace ...
    [d] = validate_objects(load_manifests(text, "t.yaml")[2:], "t.yaml", "default")
    assert d["metadata"]["namespace"] == "other"
    # ... but an explicit -n default does, as with kubectl.
    with pytest.raises(InvalidManifest) as e:
        validate_objects(load_manifests(text, "t.yaml")[2:], "t.yaml", "default",
                         enforce_namespace=True)
    assert e.value.errors == ['Service other/b: metadata.namespace: "other" does not match the '
                              'namespace "default" this apply was given']


def test_same_name_in_different_namespaces_or_kinds_is_not_a_duplicate() -> None:
    text = textwrap.dedent("""\
        apiVersion: v1
        kind: Service
        metadata: {name: web, namespace: a}
        spec: {ports: [{port: 80}]}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: web, namespace: b}
        spec: {ports: [{port: 80}]}
        ---
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: web, namespace: a}
        """)
    assert len(validate_objects(load_manifests(text, "t.yaml"), "t.yaml")) == 3


def test_service_defaults() -> None:
    svc = one("""\
        apiVersion: v1
        kind: Service
        metadata: {name: web}
        spec:
          sessionAffinity: ClientIP
          ports:
          - {name: http, port: 80}
          - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
        """)
    spec = svc["spec"]
    assert spec["type"] == "ClusterIP"
    assert spec["ports"][0] == {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 80}
    assert spec["ports"][1]["targetPort"] == 5353
    assert spec["sessionAffinityConfig"] == {"clientIP": {"timeoutSeconds": 10800}}
    assert spec["ipFamilies"] == ["IPv4"] and spec["ipFamilyPolicy"] == "SingleStack"
    assert "clusterIP" not in spec  # allocated at admission


def test_service_cluster_ips_normalised() -> None:
    svc = one("""\
        apiVersion: v1
        kind: Service
        metadata: {name: web}
        spec:
          clusterIPs: [10.96.3.3]
          ports: [{port: 80}]
        """)
    assert svc["spec"]["clusterIP"] == "10.96.3.3"
    svc = one("""\
        apiVersion: v1
        kind: Service
        metadata: {name: web}
        spec:
          clusterIP: ""
          ports: [{port: 80}]
        """)
    assert "clusterIP" not in svc["spec"]


def test_headless_service_may_have_no_ports() -> None:
    svc = one("""\
        apiVersion: v1
        kind: Service
        metadata: {name: db}
        spec:
          clusterIP: None
          selector: {app: db}
        """)
    assert svc["spec"]["clusterIP"] == "None"


def test_pod_and_deployment_defaults() -> None:
    dep = one("""\
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: web}
        spec:
          selector: {matchLabels: {app: web}}
          template:
            metadata: {labels: {app: web}}
            spec:
              containers:
              - name: web
                image: nginx
                ports: [{containerPort: 80}]
                env:
                - name: NS
                  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
                readinessProbe:
                  httpGet: {port: 80, httpHeaders: [{name: X-Probe}]}
        """)
    spec = dep["spec"]
    assert spec["replicas"] == 1
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Always"
    assert pod["terminationGracePeriodSeconds"] == 30
    c = pod["containers"][0]
    assert c["ports"][0]["protocol"] == "TCP"
    assert c["env"][0]["valueFrom"]["fieldRef"]["apiVersion"] == "v1"
    probe = c["readinessProbe"]
    assert probe["httpGet"]["scheme"] == "HTTP"
    assert probe["httpGet"]["httpHeaders"] == [{"name": "X-Probe", "value": ""}]
    assert (probe["initialDelaySeconds"], probe["timeoutSeconds"], probe["periodSeconds"],
            probe["successThreshold"], probe["failureThreshold"]) == (0, 1, 10, 1, 3)


def test_generated_manifests_with_empty_refused_fields_are_accepted() -> None:
    pod = one("""\
        apiVersion: v1
        kind: Pod
        metadata: {name: p}
        spec:
          hostNetwork: false
          volumes: []
          initContainers: []
          nodeSelector: {}
          containers:
          - name: c
            image: busybox
            volumeMounts: []
            ports: [{containerPort: 80, hostPort: 0}]
        """)
    assert pod["spec"]["containers"][0]["name"] == "c"


def test_networkpolicy_defaults() -> None:
    policies = load(os.path.join(FIXTURES, "networkpolicy-docs.yaml"))
    nps = {o["metadata"]["name"]: o for o in policies}
    assert nps["allow-all-ingress"]["spec"]["policyTypes"] == ["Ingress"]
    assert nps["alice-clients"]["spec"]["policyTypes"] == ["Ingress"]
    assert nps["allow-dns-named-port"]["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert nps["allow-dns-named-port"]["spec"]["egress"][0]["ports"][1] == {
        "port": "dns-tcp", "protocol": "TCP"}
    bare = one("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny}\n")
    assert bare["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}


def test_cilium_defaults() -> None:
    cnps = {o["metadata"]["name"]: o for o in load(os.path.join(FIXTURES, "cilium-policies.yaml"))}
    ports = cnps["l3-l4-rule"]["spec"]["ingress"][0]["toPorts"][0]["ports"]
    assert ports == [{"port": "80", "protocol": "TCP"}, {"port": "http-alt", "protocol": "ANY"}]
    assert len(cnps["multi-rule"]["specs"]) == 2


def test_httproute_defaults() -> None:
    route = one("""\
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {name: r}
        spec:
          parentRefs: [{group: "", kind: Service, name: echo}]
          rules:
          - backendRefs: [{name: echo, port: 80}]
          - matches: [{headers: [{name: v, value: "1"}]}, {path: {value: /x}}]
            filters:
            - type: RequestRedirect
              requestRedirect: {hostname: example.org}
            - type: RequestMirror
              requestMirror:
                backendRef: {name: shadow, port: 80}
                fraction: {numerator: 1}
        """)
    r0, r1 = route["spec"]["rules"]
    assert r0["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    assert r0["backendRefs"] == [{"name": "echo", "port": 80, "group": "", "kind": "Service",
                                  "weight": 1}]
    assert r1["matches"][0] == {"headers": [{"name": "v", "value": "1", "type": "Exact"}],
                                "path": {"type": "PathPrefix", "value": "/"}}
    assert r1["matches"][1]["path"] == {"value": "/x", "type": "PathPrefix"}
    assert r1["filters"][0]["requestRedirect"]["statusCode"] == 302
    mirror = r1["filters"][1]["requestMirror"]
    assert mirror["fraction"] == {"numerator": 1, "denominator": 100}
    assert mirror["backendRef"]["kind"] == "Service"
    no_rules = one("""\
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {name: r}
        spec:
          parentRefs: [{group: "", kind: Service, name: echo}]
        """)
    assert no_rules["spec"]["rules"] == [{"matches": [{"path": {"type": "PathPrefix",
                                                                "value": "/"}}]}]


def test_regular_expressions_are_not_checked() -> None:
    # RE2 rejects look-behind; the Gateway API does not check regexes, so neither do we.
    route = one("""\
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {name: r}
        spec:
          rules:
          - matches:
            - path: {type: RegularExpression, value: "(?<=a)b["}
              headers: [{type: RegularExpression, name: x, value: "(?<!z)"}]
        """)
    assert route["spec"]["rules"][0]["matches"][0]["path"]["value"] == "(?<=a)b["


def test_grpcroute_defaults() -> None:
    route = one("""\
        apiVersion: gateway.networking.k8s.io/v1
        kind: GRPCRoute
        metadata: {name: g}
        spec:
          parentRefs: [{group: "", kind: Service, name: echo, port: 7070}]
          rules:
          - matches: [{method: {service: grpc.health.v1.Health}}, {method: {method: Check}}]
            backendRefs: [{name: echo, port: 7070}]
        """)
    m = route["spec"]["rules"][0]["matches"]
    assert m[0]["method"] == {"service": "grpc.health.v1.Health", "type": "Exact"}
    assert route["spec"]["rules"][0]["backendRefs"][0]["weight"] == 1


def test_parent_refs_to_one_service_with_distinct_ports() -> None:
    route = one("""\
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {name: r}
        spec:
          parentRefs:
          - {group: "", kind: Service, name: echo, port: 80}
          - {group: "", kind: Service, name: echo, port: 8080}
        """)
    assert len(route["spec"]["parentRefs"]) == 2


# -- mutual TLS: ServiceAccount, PeerAuthentication, CiliumNetworkPolicy authentication ------


def test_mutual_tls_fixture() -> None:
    objs = {(o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]): o
            for o in load(os.path.join(FIXTURES, "mutual-tls.yaml"))}
    sa = objs["ServiceAccount", "foo", "finance"]
    assert sa["automountServiceAccountToken"] is False
    assert sa["imagePullSecrets"] == [{"name": "registry"}]
    assert sa["secrets"] == [{"name": "finance-token-x2v6c"}]
    # An unquoted port key (a YAML number) is stored as a string, as JSON and Kubernetes have it.
    finance = objs["PeerAuthentication", "foo", "finance"]
    assert finance["spec"]["portLevelMtls"] == {"8080": {"mode": "DISABLE"}}
    # v1beta1 has v1's schema and is stored as v1.
    ledger = objs["PeerAuthentication", "foo", "ledger"]
    assert ledger["apiVersion"] == "security.istio.io/v1"
    assert ledger["spec"]["mtls"] == {"mode": "UNSET"}
    rule = objs["CiliumNetworkPolicy", "default", "mutual-auth-echo"]["spec"]
    assert rule["ingress"][0]["authentication"] == {"mode": "required"}
    assert rule["egress"][0]["authentication"] == {"mode": "disabled"}


def test_service_account_as_kubectl_writes_it() -> None:
    # `kubectl create serviceaccount robot --dry-run=client -o yaml`, and an older cluster's
    # `get -o yaml` with a token Secret as a full ObjectReference.
    sa = one("""\
        apiVersion: v1
        kind: ServiceAccount
        metadata:
          creationTimestamp: null
          name: robot
        """)
    assert sa == {"apiVersion": "v1", "kind": "ServiceAccount",
                  "metadata": {"name": "robot", "namespace": "default"}}
    sa = one("""\
        apiVersion: v1
        kind: ServiceAccount
        metadata:
          name: robot
          namespace: prod
          uid: 0b5f6a4e-8d7c-4d59-9f3e-2f1e8c1d2a3b
          resourceVersion: "812"
        automountServiceAccountToken: true
        secrets:
        - apiVersion: v1
          kind: Secret
          name: robot-token-abcde
          namespace: prod
        """)
    assert sa["metadata"] == {"name": "robot", "namespace": "prod"}
    assert sa["secrets"] == [{"apiVersion": "v1", "kind": "Secret", "name": "robot-token-abcde",
                              "namespace": "prod"}]


def test_pod_service_account_need_not_exist() -> None:
    # No existence check (there is no token to mount); the name is kept as written.
    pod = one("""\
        apiVersion: v1
        kind: Pod
        metadata: {name: p}
        spec:
          serviceAccountName: no-such-account
          containers: [{name: c, image: busybox}]
        """)
    assert admit([pod], lambda kind, ns: [])[0]["spec"]["serviceAccountName"] == "no-such-account"
    # Unset stays unset in the stored Pod (the workload identity then uses "default").
    bare = one("""\
        apiVersion: v1
        kind: Pod
        metadata: {name: p}
        spec:
          containers: [{name: c, image: busybox}]
        """)
    assert "serviceAccountName" not in bare["spec"]


@pytest.mark.parametrize("name", ["default", "robot", "robot-v2", "api.prod", "0", "a" * 253,
                                  "a" * 63 + "." + "b" * 63])
@pytest.mark.parametrize("field", ["serviceAccountName", "serviceAccount"])
def test_service_account_names_kubernetes_accepts(field: str, name: str) -> None:
    # Any DNS-1123 subdomain, as Kubernetes validates it; kept as written.
    pod = one(f"""\
        apiVersion: v1
        kind: Pod
        metadata: {{name: p}}
        spec:
          {field}: "{name}"
          containers: [{{name: c, image: busybox}}]
        """)
    assert pod["spec"][field] == name
    dep = one(f"""\
        apiVersion: apps/v1
        kind: Deployment
        metadata: {{name: web}}
        spec:
          selector: {{matchLabels: {{app: web}}}}
          template:
            metadata: {{labels: {{app: web}}}}
            spec:
              {field}: "{name}"
              containers: [{{name: c, image: busybox}}]
        """)
    assert dep["spec"]["template"]["spec"][field] == name


def test_empty_service_account_name_means_default() -> None:
    # Kubernetes accepts "" (then fills in "default"); so does nodemesh (certs/authorize.py).
    pod = one("""\
        apiVersion: v1
        kind: Pod
        metadata: {name: p}
        spec:
          serviceAccountName: ""
          serviceAccount: ""
          containers: [{name: c, image: busybox}]
        """)
    assert pod["spec"]["serviceAccountName"] == ""


def test_peer_authentication_defaults() -> None:
    # Without spec: a namespace-wide policy whose mode is UNSET (it changes nothing).
    pa = one("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a}\n")
    assert pa["spec"] == {"mtls": {"mode": "UNSET"}}
    pa = one("""\
        apiVersion: security.istio.io/v1beta1
        kind: PeerAuthentication
        metadata: {name: a, namespace: foo}
        spec:
          selector: {matchLabels: {app: web}}
          mtls: {}
          portLevelMtls:
            8080: {}
            "9090": {mode: PERMISSIVE}
            65535: {mode: STRICT}
            1: {mode: DISABLE}
        """)
    assert pa["apiVersion"] == "security.istio.io/v1"
    assert pa["spec"] == {
        "selector": {"matchLabels": {"app": "web"}},
        "mtls": {"mode": "UNSET"},
        "portLevelMtls": {"8080": {"mode": "UNSET"}, "9090": {"mode": "PERMISSIVE"},
                          "65535": {"mode": "STRICT"}, "1": {"mode": "DISABLE"}},
    }


@pytest.mark.parametrize("mode", ["UNSET", "DISABLE", "PERMISSIVE", "STRICT"])
def test_peer_authentication_modes(mode: str) -> None:
    pa = one(f"""\
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {{name: a, namespace: nodemesh-system}}
        spec:
          mtls: {{mode: {mode}}}
        """)
    assert pa["spec"]["mtls"]["mode"] == mode


def test_peer_authentication_selectors_without_labels_are_namespace_wide() -> None:
    # Istio treats them as no selector: allowed anywhere, also in the root namespace, and empty
    # portLevelMtls (as generated manifests carry) is harmless.
    for selector in ("{}", "{matchLabels: {}}"):
        pa = one(f"""\
            apiVersion: security.istio.io/v1
            kind: PeerAuthentication
            metadata: {{name: a, namespace: nodemesh-system}}
            spec:
              selector: {selector}
              portLevelMtls: {{}}
            """)
        assert pa["spec"]["portLevelMtls"] == {}


def test_peer_authentication_apply_needs_its_namespace() -> None:
    pa = """\
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: default, namespace: nodemesh-system}
        spec: {mtls: {mode: PERMISSIVE}}
        """
    with pytest.raises(InvalidManifest) as e:
        admit([one(pa)], lambda kind, ns: [])
    assert e.value.errors == [
        'PeerAuthentication nodemesh-system/default: metadata.namespace: namespace '
        '"nodemesh-system" does not exist (create it first, or apply a Namespace nodemesh-system '
        "in the same apply)"]
    ns = one("apiVersion: v1\nkind: Namespace\nmetadata: {name: nodemesh-system}\n")
    assert len(admit([ns, one(pa)], lambda kind, ns: [])) == 2


def test_cilium_authentication_modes() -> None:
    cnp = one("""\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: c}
        specs:
        - endpointSelector: {}
          ingress:
          - authentication: {mode: required}
          - fromEndpoints: [{}]
            authentication: {mode: disabled}
        - endpointSelector: {}
          egress:
          - toEndpoints: [{}]
            authentication: {mode: required}
        """)
    first, second = cnp["specs"]
    assert [r["authentication"]["mode"] for r in first["ingress"]] == ["required", "disabled"]
    assert second["egress"][0]["authentication"] == {"mode": "required"}
