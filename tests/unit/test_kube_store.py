"""The Kubernetes-mode store against recorded API server answers (tests/unit/kubereplay.py).

No API server runs here (none can be installed on these machines): each test replays a
transcript of what kube-apiserver answers (lists with resourceVersion and continue tokens, watch
streams with BOOKMARK and ERROR 410 events, 409 Conflict and AlreadyExists Status objects)
through the client's own HTTP layer (lightkube's configuration, httpx2's MockTransport), and
checks the protocol handling: the requests the store sends, in order, and what it makes of the
answers.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from nodemesh.errors import Conflict, NodemeshError
from nodemesh.store.base import ADDED, DELETED, MODIFIED
from nodemesh.store.identities import allocate_identity
from nodemesh.store.informer import Informer
from nodemesh.store.kubernetes import API_KINDS, KubeStore, connect
from tests.unit.kubereplay import KUBECONFIG, Replay


def _store(tmp_path: Path, replay: Replay, kinds: tuple[str, ...] = (), **kw) -> KubeStore:
    cfg = tmp_path / "kubeconfig"
    cfg.write_text(KUBECONFIG)
    return KubeStore(connect(str(cfg), transport=replay.transport()), kinds=kinds, **kw)


def _until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def closing():
    opened: list[tuple[KubeStore, Replay]] = []
    yield opened
    for store, replay in opened:
        replay.done.set()
        store.close()


def test_list_watch_bookmark_410_relist(tmp_path: Path, closing) -> None:
    replay = Replay("pods_relist")
    store = _store(tmp_path, replay, ("Pod",), field_selectors={"Pod": "spec.nodeName=node1"})
    closing.append((store, replay))
    inf = Informer(store)
    inf.start()
    assert inf.wait_synced(10)
    # Every recorded exchange was asked for, in order; the last watch resumes from the
    # relist's resourceVersion and is left waiting.
    _until(lambda: not replay.remaining() and len(replay.requests) >= 7)
    _until(lambda: inf.get("Pod", "prod", "client") is None)
    assert replay.unexpected == []
    rvs = [q.get("resourceVersion") for m, _, q, _ in replay.requests if q.get("watch")]
    assert rvs[:4] == ["1000", "1050", "1200", "1210"]  # 1050: the bookmark's
    assert all(q["allowWatchBookmarks"] == "true" for _, _, q, _ in replay.requests
               if q.get("watch"))
    assert all(q["fieldSelector"] == "spec.nodeName=node1" for _, _, q, _ in replay.requests)
    assert replay.headers[0]["authorization"] == "Bearer recorded-token"  # lightkube's auth
    assert store.reflector("Pod").lists == 2
    # The informer's copy: web-2 was deleted while the watch was expired, client afterwards.
    pods = {p["metadata"]["name"]: p for p in inf.list("Pod")}
    assert set(pods) == {"web-1"}
    assert pods["web-1"]["metadata"]["labels"] == {"app": "web", "tier": "front"}
    assert pods["web-1"]["kind"] == "Pod" and pods["web-1"]["apiVersion"] == "v1"
    first = store.events_since(0)[0].object  # web-1 as listed: trimmed of what is never read
    assert "managedFields" not in first["metadata"]
    assert first["metadata"]["annotations"] == {"example.com/owner": "team-a"}
    events = [(e.type, e.object["metadata"]["name"]) for e in store.events_since(0)]
    assert events == [(ADDED, "web-1"), (ADDED, "web-2"),           # the paginated list
                      (ADDED, "client"), (MODIFIED, "web-1"),        # the first watch
                      (MODIFIED, "client"), (DELETED, "web-2"),      # the relist's difference
                      (DELETED, "client")]                           # the last watch
    assert [e.revision for e in store.events_since(0)] == list(range(1, 8))
    inf.stop()


def test_errors_back_off_and_resume_then_gone_relists(tmp_path: Path, closing, caplog) -> None:
    replay = Replay("services_backoff")
    slept: list[float] = []
    store = _store(tmp_path, replay, ("Service",), sleep=slept.append, jitter=lambda: 0.0)
    closing.append((store, replay))
    with caplog.at_level("INFO", logger="nodemesh.store.kubernetes"):
        store.start()
        assert store.wait_synced(10)
        _until(lambda: not replay.remaining() and len(replay.requests) >= 8)
    assert ("services: kubernetes API: GET /api/v1/services (watch): 503 ServiceUnavailable: "
            "the server is currently unable to handle the request; retrying in 0.2 s") in caplog.text
    assert ("services: store unavailable: kubernetes API: GET /api/v1/services (watch): "
            "[Errno 111] Connection refused; retrying in 0.4 s") in caplog.text
    assert ("services: kubernetes API: GET /api/v1/services (watch): 410 Gone: too old resource "
            "version: 510 (700); listing again") in caplog.text
    assert replay.unexpected == []
    # 503, connection refused, 500: 0.2 s, 0.4 s, 0.8 s, each resuming from the same version
    # (no relist); then the event, and 410 Gone on the watch request: a relist, no wait.
    assert slept == [0.2, 0.4, 0.8]
    seen = [(q.get("watch") == "true", q.get("resourceVersion")) for _, _, q, _ in replay.requests]
    assert seen[:8] == [(False, None), (True, "500"), (True, "500"), (True, "500"),
                        (True, "500"), (True, "510"), (False, None), (True, "700")]
    assert store.reflector("Service").lists == 2
    svc = store.list_with_revision(("Service",))[0][0]
    assert svc["metadata"]["resourceVersion"] == "690"


def test_status_write_retries_a_conflict_with_a_fresh_read(tmp_path: Path, closing) -> None:
    replay = Replay("status_conflict")
    store = _store(tmp_path, replay)
    closing.append((store, replay))
    cur = replay.exchanges[-1]["response"]["body"]["status"]
    with store.transaction() as t:
        out = t.put_status("HTTPRoute", "prod", "web", cur)
    assert out is not None and out["metadata"]["resourceVersion"] == "302"
    assert replay.remaining() == [] and replay.unexpected == []
    puts = [(p, b["metadata"]["resourceVersion"]) for m, p, _, b in replay.requests if m == "PUT"]
    assert puts == [("/apis/gateway.networking.k8s.io/v1/namespaces/prod/httproutes/web/status",
                     "300"),
                    ("/apis/gateway.networking.k8s.io/v1/namespaces/prod/httproutes/web/status",
                     "301")]
    assert store.status_conflicts == 1


def test_status_write_gives_up_after_repeated_conflicts(tmp_path: Path, closing) -> None:
    replay = Replay("status_conflict_always")
    store = _store(tmp_path, replay)
    closing.append((store, replay))
    with (pytest.raises(Conflict, match=r"HTTPRoute prod/web: status not written after 5 conflicts"),
          store.transaction() as t):
        t.put_status("HTTPRoute", "prod", "web", {"parents": []})
    assert replay.remaining() == [] and replay.unexpected == []


def test_identity_number_taken_by_other_labels_moves_on(tmp_path: Path, closing) -> None:
    replay = Replay("identity_taken")
    store = _store(tmp_path, replay)
    closing.append((store, replay))
    num = allocate_identity(store, {"app": "api", "io.kubernetes.pod.namespace": "prod"})
    assert num == 258
    assert replay.remaining() == [] and replay.unexpected == []
    posts = [(b["metadata"]["name"], b["spec"]["labels"]["app"], b["apiVersion"], b["kind"])
             for m, _, _, b in replay.requests if m == "POST"]
    assert posts == [("257", "api", "nodemesh.io/v1", "Identity"),
                     ("258", "api", "nodemesh.io/v1", "Identity")]


def test_identity_created_meanwhile_for_same_labels_is_reused(tmp_path: Path, closing) -> None:
    replay = Replay("identity_same_labels")
    store = _store(tmp_path, replay)
    closing.append((store, replay))
    now = 1796644800.0  # 2026-12-07T12:00:00Z
    num = allocate_identity(store, {"app": "api", "io.kubernetes.pod.namespace": "prod"}, now=now)
    assert num == 257
    assert replay.remaining() == [] and replay.unexpected == []
    # One POST only: the second look found the labels and did not create another number.
    assert [m for m, *_ in replay.requests].count("POST") == 1


def test_api_paths_per_kind() -> None:
    assert API_KINDS["Pod"].path("prod", "web", "status") == "/api/v1/namespaces/prod/pods/web/status"
    assert API_KINDS["Pod"].path() == "/api/v1/pods"
    assert API_KINDS["Namespace"].path(None, "prod") == "/api/v1/namespaces/prod"
    assert (API_KINDS["EndpointSlice"].path("prod")
            == "/apis/discovery.k8s.io/v1/namespaces/prod/endpointslices")
    assert (API_KINDS["NetworkPolicy"].path("prod")
            == "/apis/networking.k8s.io/v1/namespaces/prod/networkpolicies")
    assert API_KINDS["CiliumNetworkPolicy"].path() == "/apis/cilium.io/v2/ciliumnetworkpolicies"
    assert (API_KINDS["GRPCRoute"].path("a", "b")
            == "/apis/gateway.networking.k8s.io/v1/namespaces/a/grpcroutes/b")
    assert API_KINDS["Identity"].path(None, "300", "status") == "/apis/nodemesh.io/v1/identities/300/status"
    assert API_KINDS["PeerAuthentication"].path() == "/apis/security.istio.io/v1/peerauthentications"


def test_bad_kubeconfig_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(NodemeshError, match=f"kubernetes: can not use {missing}") as e:
        connect(str(missing))
    assert e.value.exit_code == 2


def test_kind_without_its_crd_follows_as_empty_and_looks_again(tmp_path: Path, closing) -> None:
    replay = Replay("crd_absent")
    slept: list[float] = []
    store = _store(tmp_path, replay, ("CiliumNetworkPolicy",), sleep=slept.append)
    closing.append((store, replay))
    assert store.wait_synced(10)  # a 404 is an answer: the agent does not wait for the CRD
    _until(lambda: not replay.remaining())
    _until(lambda: len(store.list_with_revision()[0]) == 1)
    assert slept == [60.0] and replay.unexpected == []
    assert [(e.type, e.object["metadata"]["name"]) for e in store.events_since(0)] == [
        (ADDED, "allow-web")]


def test_node_status_is_left_to_the_kubelet(tmp_path: Path, closing) -> None:
    replay = Replay("node_get")
    store = _store(tmp_path, replay)
    closing.append((store, replay))
    with store.transaction() as t:
        node = t.put_status("Node", "", "node1", {"conditions": []})
    assert node is not None and node["status"]["conditions"][0]["type"] == "Ready"
    assert [m for m, *_ in replay.requests] == ["GET"] and replay.unexpected == []


def test_in_cluster_service_account_and_token_rotation(tmp_path: Path, monkeypatch,
                                                      closing) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    now = datetime.datetime.now(datetime.UTC)
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
          .public_key(key.public_key()).serial_number(1).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(key, hashes.SHA256()))
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (sa / "namespace").write_text("nodemesh-system")
    (sa / "token").write_text("token-1")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    replay = Replay("token_rotated")
    store = KubeStore(connect(transport=replay.transport(), service_account=str(sa)), kinds=())
    closing.append((store, replay))
    assert store.get("Node", "", "node1") is not None
    (sa / "token").write_text("token-2")  # the kubelet rotated it
    assert store.get("Node", "", "node1") is not None  # 401 with the old one, then the new
    assert replay.remaining() == [] and replay.unexpected == []
    assert [h["authorization"] for h in replay.headers] == [
        "Bearer token-1", "Bearer token-1", "Bearer token-2"]
    assert all(h["host"] == "10.96.0.1" for h in replay.headers)


def test_a_watcher_behind_the_local_history_gets_compacted(tmp_path: Path, monkeypatch,
                                                           closing) -> None:
    import nodemesh.store.kubernetes as mod
    from nodemesh.store.base import Compacted

    monkeypatch.setattr(mod, "HISTORY", 3)
    replay = Replay("node_get")
    store = _store(tmp_path, replay)
    closing.append((store, replay))
    store._emit([(ADDED, {"kind": "Pod", "metadata": {"name": f"p{i}", "namespace": "a"}})
                 for i in range(5)])
    with pytest.raises(Compacted):
        store.events_since(1)
    assert [e.revision for e in store.events_since(2)] == [3, 4, 5]
    assert store.watch(5, 0.05) == []


def test_forbidden_is_logged_with_the_servers_words_and_retried(tmp_path: Path, closing,
                                                                caplog) -> None:
    replay = Replay("forbidden")
    slept: list[float] = []
    store = _store(tmp_path, replay, ("NetworkPolicy",), sleep=slept.append, jitter=lambda: 0.0)
    closing.append((store, replay))
    with caplog.at_level("WARNING", logger="nodemesh.store.kubernetes"):
        assert store.wait_synced(10)
    assert slept == [0.2] and replay.unexpected == []
    assert ("networkpolicies: kubernetes API: GET /apis/networking.k8s.io/v1/networkpolicies: "
            "403 Forbidden: networkpolicies.networking.k8s.io is forbidden: User "
            "\"system:serviceaccount:nodemesh-system:nodemesh-agent\" cannot list"
            ) in caplog.text
