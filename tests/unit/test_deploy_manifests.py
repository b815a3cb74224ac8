"""deploy/kubernetes/: valid for Kubernetes 1.33 and what a reviewer checks.

Every manifest is validated (strictly: unknown fields fail) against the Kubernetes OpenAPI
schemas that `kubernetes-validate` bundles (offline). The Identity CRD's own schema must accept
the objects the identity allocator writes. Then the reviewer's points: resources and probes on
every container, pinned image tags, the agent's host access, the node Envoy apart from the
agent, and RBAC exactly as the Kubernetes store needs it (no wildcard, nothing unused).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from nodemesh.store.identities import identity_object
from nodemesh.store.kubernetes import AGENT_KINDS, API_KINDS

K8S_VERSION = "1.33.0"
DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"


def _docs() -> list[tuple[str, dict]]:
    out = []
    for f in sorted(DEPLOY.glob("*.yaml")):
        out.extend((f.name, d) for d in yaml.safe_load_all(f.read_text()) if d)
    return out


DOCS = _docs()


def _one(kind: str, name: str) -> dict:
    return next(d for _, d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name)


def _pod_specs() -> list[tuple[str, dict]]:
    return [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for _, d in DOCS
            if d["kind"] in ("DaemonSet", "Deployment")]


@pytest.mark.parametrize("doc", [d for _, d in DOCS],
                         ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in DOCS])
def test_manifest_is_valid(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_validation_catches_a_bad_field() -> None:
    bad = copy.deepcopy(_one("DaemonSet", "nodemesh-agent"))
    bad["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def _crd_schema() -> dict:
    crd = _one("CustomResourceDefinition", "identities.nodemesh.io")
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

    def strip(x):  # Kubernetes' extensions are no JSON Schema keywords
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if not k.startswith("x-kubernetes-")}
        return [strip(v) for v in x] if isinstance(x, list) else x

    return strip(schema)


def test_identity_crd_accepts_what_the_allocator_writes() -> None:
    crd = _one("CustomResourceDefinition", "identities.nodemesh.io")
    info = API_KINDS["Identity"]
    assert crd["spec"]["group"] + "/" + crd["spec"]["versions"][0]["name"] == info.api_version
    assert crd["spec"]["names"]["plural"] == info.plural
    assert crd["spec"]["names"]["kind"] == "Identity" and crd["spec"]["scope"] == "Cluster"
    assert "status" in crd["spec"]["versions"][0]["subresources"]
    schema = _crd_schema()
    jsonschema.Draft7Validator.check_schema(schema)

    def structural(node: dict, where: str) -> None:  # the API server's "structural schema" rule
        assert "type" in node, f"{where}: every schema node needs a type"
        assert not ("properties" in node and "additionalProperties" in node), where
        for k, sub in (node.get("properties") or {}).items():
            structural(sub, f"{where}.{k}")
        if isinstance(node.get("additionalProperties"), dict):
            structural(node["additionalProperties"], f"{where}.*")

    structural(schema, "openAPIV3Schema")
    obj = identity_object(300, {"app": "web", "io.kubernetes.pod.namespace": "prod"})
    obj["status"] = {"lastUsed": "2026-12-07T12:00:00Z"}
    jsonschema.validate(obj, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**obj, "spec": {"labels": {"app": 7}}}, schema)


def test_every_container_has_requests_limits_and_pinned_image() -> None:
    for name, spec in _pod_specs():
        for c in spec.get("initContainers", []) + spec["containers"]:
            where = f"{name}/{c['name']}"
            res = c.get("resources") or {}
            assert {"cpu", "memory"} <= set(res.get("requests") or {}), where
            assert "memory" in (res.get("limits") or {}), where
            image = c["image"]
            assert re.fullmatch(r"[\w.\-/:]+:(?!latest$)[\w.\-]+", image), f"{where}: {image}"


def test_long_running_containers_have_probes() -> None:
    for name, spec in _pod_specs():
        for c in spec["containers"]:
            assert c.get("livenessProbe") and c.get("readinessProbe"), f"{name}/{c['name']}"


def test_agent_has_host_access_and_envoy_is_apart() -> None:
    agent = _one("DaemonSet", "nodemesh-agent")["spec"]["template"]["spec"]
    assert agent["hostNetwork"] is True
    c = agent["containers"][0]
    assert c["securityContext"]["privileged"] is True
    assert "--kubernetes" in c["command"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert {"/sys/fs/bpf", "/sys/fs/cgroup", "/var/run/nodemesh"} <= set(mounts)
    assert mounts["/sys/fs/bpf"]["mountPropagation"] == "Bidirectional"
    hostpaths = {v["name"]: v["hostPath"]["path"] for v in agent["volumes"] if "hostPath" in v}
    init = agent["initContainers"][0]
    assert {hostpaths[m["name"]] for m in init["volumeMounts"] if m["name"] in hostpaths} == {
        "/opt/cni/bin", "/etc/cni/net.d"}
    # The node Envoy: its own DaemonSet, sharing only the host directory of the xDS socket.
    envoy = _one("DaemonSet", "nodemesh-envoy")
    espec = envoy["spec"]["template"]["spec"]
    assert envoy["spec"]["updateStrategy"]["type"] == "OnDelete"
    assert [v["hostPath"]["path"] for v in espec["volumes"]] == [hostpaths["run"]]
    assert espec["automountServiceAccountToken"] is False
    assert "privileged" not in espec["containers"][0]["securityContext"]
    # The agent adopts the Envoy the launcher records: both see the node's PIDs, and the
    # launcher's directory is the agent's Envoy directory for that node.
    assert agent["hostPID"] is True and espec["hostPID"] is True
    launcher = " ".join(espec["containers"][0]["command"] + espec["containers"][0]["args"])
    assert "python3 -m nodemesh.proxy.external \"/var/run/nodemesh/nodes/$NODE_NAME/envoy\"" \
        in launcher
    settings = json.loads(_one("ConfigMap", "nodemesh-config")["data"]["cluster.json"])
    assert settings["extra"]["proxy"] == "external"


# What the Kubernetes store does per kind: follows it (list, watch), reads it before a status
# write (get), writes its status (update on /status), creates it (create).
STATUS_WRITTEN = {"HTTPRoute", "GRPCRoute", "Identity"}
CREATED = {"Identity"}


def _needed() -> dict[tuple[str, str], set[str]]:
    need: dict[tuple[str, str], set[str]] = {}
    for kind in AGENT_KINDS:
        ak = API_KINDS[kind]
        group = ak.api_version.rpartition("/")[0]
        verbs = need.setdefault((group, ak.plural), set())
        verbs |= {"list", "watch"}
        if kind in STATUS_WRITTEN:
            verbs.add("get")
            need[(group, ak.plural + "/status")] = {"update"}
        if kind in CREATED:
            verbs.add("create")
    need[("", "nodes")].add("get")  # the agent reads its own Node at start (podCIDR, address)
    return need


def test_rbac_is_exactly_what_the_agent_uses() -> None:
    role = _one("ClusterRole", "nodemesh-agent")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], rule
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                granted.setdefault((g, r), set()).update(rule["verbs"])
    assert granted == _needed()
    binding = _one("ClusterRoleBinding", "nodemesh-agent")
    sa = _one("ServiceAccount", "nodemesh-agent")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]
    agent = _one("DaemonSet", "nodemesh-agent")["spec"]["template"]["spec"]
    assert agent["serviceAccountName"] == sa["metadata"]["name"]


def test_configmap_cluster_json_is_kubernetes_mode_settings() -> None:
    from nodemesh.agent.kubernetes import cluster_config

    cm = _one("ConfigMap", "nodemesh-config")
    settings = json.loads(cm["data"]["cluster.json"])
    node = {"metadata": {"name": "node1"}, "spec": {"podCIDR": "10.244.1.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.11"}]}}
    cfg = cluster_config(settings, node, "/var/run/nodemesh")
    assert cfg.node("node1").pod_cidr == "10.244.1.0/24"
    # The Envoy DaemonSet's launcher directory is the agent's Envoy directory.
    from nodemesh.agent.proxy import ProxyManager
    from nodemesh.observe.ring import FlowRing

    pm = ProxyManager(cfg, "node1", None, FlowRing(16))  # type: ignore[arg-type]
    assert pm.envoy_dir == "/var/run/nodemesh/nodes/node1/envoy" and pm.external


def test_install_cni_chains_after_the_primary_plugin(tmp_path: Path) -> None:
    cm = _one("ConfigMap", "nodemesh-config")
    script = tmp_path / "install-cni.py"
    script.write_text(cm["data"]["install-cni.py"])
    spec = importlib.util.spec_from_file_location("install_cni", script)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    binary, bin_dir, net_dir = tmp_path / "nodemesh-cni", tmp_path / "bin", tmp_path / "net.d"
    binary.write_bytes(b"\x7fELF")
    net_dir.mkdir()
    primary = {"cniVersion": "1.0.0", "name": "k8s-pod-network",
               "plugins": [{"type": "calico"}, {"type": "portmap"}]}
    (net_dir / "10-calico.conflist").write_text(json.dumps(primary))
    (net_dir / "99-other.conflist").write_text(json.dumps(primary))
    for _ in range(2):  # twice: an init container runs again on every agent pod start
        mod.install(str(binary), str(bin_dir), str(net_dir),
                    "/var/run/nodemesh/nodes/node1/agent.sock")
    conf = json.loads((net_dir / "10-calico.conflist").read_text())
    assert [p["type"] for p in conf["plugins"]] == ["calico", "portmap", "nodemesh-cni"]
    assert json.loads((net_dir / "99-other.conflist").read_text()) == primary
    assert (bin_dir / "nodemesh-cni").read_bytes() == b"\x7fELF"
    assert (bin_dir / "nodemesh-cni").stat().st_mode & 0o777 == 0o755
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match=r"no \*\.conflist"):
        mod.install(str(binary), str(bin_dir), str(empty), "/x")


def test_the_cni_plugin_calls_the_socket_the_agent_listens_on() -> None:
    """install-cni writes agentSocket into the chain; it must be the kube-mode agent's own API
    socket (<state dir>/nodes/<node>/agent.sock, ClusterConfig.agent_socket)."""
    from nodemesh.cluster.config import ClusterConfig, NodeConfig

    spec = _one("DaemonSet", "nodemesh-agent")["spec"]["template"]["spec"]
    install = next(c for c in spec["initContainers"] if c["name"] == "install-cni")
    agent = next(c for c in spec["containers"] if c["name"] == "agent")
    state = agent["command"][agent["command"].index("--state-dir") + 1]
    node = NodeConfig(name="$(NODE_NAME)", index=1, ip="192.0.2.1", pod_cidr="10.244.1.0/24")
    cfg = ClusterConfig(name="k8s", state_dir=state, nodes=(node,))
    assert install["command"][-1] == cfg.agent_socket("$(NODE_NAME)")
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} \
        in install["env"]


def test_readme_install_steps_name_what_the_manifests_define() -> None:
    """The README's kubectl steps cannot run here (no API server): at least every name in them
    is one the manifests define."""
    readme = (DEPLOY.parents[1] / "README.md").read_text()
    section = readme.split("### On Kubernetes", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh", 1)[1].split("```", 1)[0]
    commands = [ln.strip() for ln in block.splitlines() if ln.strip().startswith("kubectl")]
    assert commands == ["kubectl apply -f deploy/kubernetes/",
                        "kubectl -n nodemesh-system rollout status daemonset/nodemesh-agent",
                        "kubectl get identities"]
    assert DEPLOY.is_dir()
    ds = _one("DaemonSet", "nodemesh-agent")
    assert ds["metadata"]["namespace"] == "nodemesh-system"
    assert _one("Namespace", "nodemesh-system")
    assert _one("CustomResourceDefinition", "identities.nodemesh.io")["spec"]["names"]["plural"] \
        == "identities"
    # kubectl applies a directory's files in name order: the namespace and the CRD first.
    names = [f for f, _ in DOCS]
    assert names == sorted(names) and names[0] == "00-namespace.yaml"
    assert [f for f, d in DOCS if d["kind"] == "CustomResourceDefinition"] == ["01-crds.yaml"]
