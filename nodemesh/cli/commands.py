"""The implementations of `nodemesh` subcommands (argument parsing lives in `main`)."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time

from nodemesh import __version__
from nodemesh.cli import output
from nodemesh.cli.selectors import parse_selector
from nodemesh.cluster import lifecycle
from nodemesh.cluster.config import (
    ClusterConfig,
    check_node_lease_seconds,
    load_cluster,
    map_sizes_for_new_cluster,
    parse_limits,
    parse_map_sizes,
    state_dir_from,
)
from nodemesh.cluster.controllers import request_delete
from nodemesh.errors import NodemeshError, NotFound
from nodemesh.host import execin, netns
from nodemesh.host.files import read_json
from nodemesh.host.procs import ProcRef
from nodemesh.model.kinds import KINDS, KindInfo, ref, resolve_kind
from nodemesh.store import Store, open_store
from nodemesh.store.apply import apply_objects, load_and_validate
from nodemesh.store.base import Txn, now_rfc3339


# ---- helpers -----------------------------------------------------------------------------
def _state_dir(args: argparse.Namespace) -> str:
    return state_dir_from(getattr(args, "state_dir", None))


def _cluster(args: argparse.Namespace) -> ClusterConfig:
    return load_cluster(_state_dir(args))


def _store(args: argparse.Namespace) -> tuple[ClusterConfig, Store]:
    cfg = _cluster(args)
    # An etcd on the cluster's underlay is reached from the underlay's namespace: the whole
    # process moves there before it opens any connection (and before any thread starts).
    # Unix sockets (agents, the CA) and files work from any namespace.
    netns.enter_for_store(cfg.store)
    return cfg, open_store(cfg.state_dir)


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise NodemeshError(f"{what} needs root (network namespaces, cgroups, BPF): "
                            "run it with sudo")


def _kind(name: str) -> KindInfo:
    info = resolve_kind(name)
    if info is None:
        known = ", ".join(sorted({k.plural for k in KINDS.values()}))
        raise NodemeshError(f"unknown resource type {name!r}; known: {known}", 2)
    return info


def _namespace(args: argparse.Namespace) -> str:
    return getattr(args, "namespace", None) or "default"


# ---- up / down / status ------------------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> int:
    from nodemesh.cluster.etcdmembers import plan_store

    # The store flags are checked before anything is created (exit 2, naming the flag).
    store = plan_store(args.name, _state_dir(args),
                       args.store or ("etcd" if args.etcd_endpoints else "sqlite"), args.store_members,
                       args.etcd_endpoints, args.etcd_ca, args.etcd_cert, args.etcd_key)
    ttl = parse_ttl(args.cert_ttl, "--cert-ttl")
    check_node_lease_seconds(args.node_lease_seconds)
    _require_root("nodemesh up")
    t0 = time.monotonic()
    map_sizes = _stopped_cluster_setting(_state_dir(args), "--map-size",
                                         parse_map_sizes(getattr(args, "map_size", [])), "maps")
    limits = _stopped_cluster_setting(_state_dir(args), "--limit",
                                      parse_limits(getattr(args, "limit", [])), "limits")
    with map_sizes_for_new_cluster(map_sizes, limits):
        cfg = lifecycle.up(_state_dir(args), args.nodes, args.name, datapath=args.datapath,
                           mtls=args.mtls, trust_domain=args.trust_domain, cert_ttl_seconds=ttl,
                           store=store if (args.store or args.etcd_endpoints) else None,
                           node_lease_seconds=args.node_lease_seconds)
    print(f"cluster {cfg.name} is up in {time.monotonic() - t0:.1f}s; "
          f"try `nodemesh get nodes` and `nodemesh apply -f app.yaml`")
    return 0


def _stopped_cluster_setting(state_dir: str, flag: str, values: dict[str, int],
                             field: str) -> dict[str, int]:
    """`up FLAG` values for an existing cluster: a stopped one (`down --keep-state`) gets them
    in its cluster.json (`field`); one that runs keeps what it has loaded, so changing them
    needs `down --keep-state` first. No cluster yet: they go into the new one's plan."""
    import dataclasses

    if not values or not os.path.exists(os.path.join(state_dir, "cluster.json")):
        return values
    cfg = load_cluster(state_dir)
    have = getattr(cfg, {"maps": "map_sizes", "limits": "datapath_limits"}[field])
    if all(have.get(k) == v for k, v in values.items()):
        return values
    if lifecycle.daemon_ref(cfg) is not None:
        raise NodemeshError(f"{flag}: cluster {cfg.name} is up with its programs and maps "
                            f"loaded; `nodemesh down --keep-state` first, then `nodemesh up "
                            f"{flag} ...` (the workloads come back)", 2)
    dataclasses.replace(cfg, **{field: {**have, **values}}).save()
    return values


_TTL_PART = re.compile(r"(\d+(?:\.\d+)?)(d|h|m|s)")


def parse_ttl(text: str, flag: str) -> float:
    """A duration such as 24h, 90m, 1h30m, 10s or 2d, in seconds."""
    parts = _TTL_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise NodemeshError(f"{flag} {text!r}: must be a duration such as 24h, 90m or 10s", 2)
    unit = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    return sum(float(n) * unit[u] for n, u in parts)


def cmd_down(args: argparse.Namespace) -> int:
    _require_root("nodemesh down")
    if not lifecycle.down(_state_dir(args), keep_state=args.keep_state):
        print(f"no cluster in {_state_dir(args)}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from nodemesh.cluster.agentclient import AgentClient

    cfg, store = _store(args)
    daemon = lifecycle.daemon_ref(cfg)
    print(f"cluster:    {cfg.name}")
    print(f"state:      {cfg.state_dir}")
    running = f"running, pid {daemon.pid}" if daemon else "NOT RUNNING (run `nodemesh up`)"
    print(f"daemon:     {running}")
    print(f"store:      {_store_line(cfg)}, revision {store.revision()}")
    if cfg.store_type == "etcd":
        _print_store_members(cfg)
    pods = store.list("Pod")
    rows = []
    for n in cfg.nodes:
        node = store.get("Node", "", n.name) or {}
        try:
            st = AgentClient(cfg.agent_socket(n.name), n.name, timeout=2).get("/status")
            agent = f"pid {st['pid']}"
        except NodemeshError:
            agent = "not running"
        if os.path.exists(cfg.agent_hold_file(n.name)):
            agent += " (held)"
        npods = sum(1 for p in pods if p["spec"].get("nodeName") == n.name)
        m = read_json(os.path.join(cfg.node_dir(n.name), "metrics.json")) or {}
        metrics = f"http://127.0.0.1:{m['port']}/metrics" if m.get("port") else "-"
        rows.append([n.name, output.node_ready(node) if node else "Unknown", n.ip, n.pod_cidr,
                     agent, str(npods), metrics])
    print()
    print(output.table(["NODE", "STATUS", "IP", "POD-CIDR", "AGENT", "PODS", "METRICS"], rows))
    phases: dict[str, int] = {}
    for p in pods:
        s = output.pod_status_text(p)
        phases[s] = phases.get(s, 0) + 1
    print()
    print(f"pods:       {len(pods)}" + (" (" + ", ".join(f"{v} {k}" for k, v in
                                                        sorted(phases.items())) + ")" if pods else ""))
    print(f"services:   {len(store.list('Service'))}")
    print(f"policies:   {len(store.list('NetworkPolicy'))} NetworkPolicy, "
          f"{len(store.list('CiliumNetworkPolicy'))} CiliumNetworkPolicy")
    routes = store.list("HTTPRoute") + store.list("GRPCRoute")
    print(f"routes:     {len(store.list('HTTPRoute'))} HTTPRoute, "
          f"{len(store.list('GRPCRoute'))} GRPCRoute")
    print(f"mtls:       {_mtls_status_line(cfg, store)}")
    # Problems a user must see: routes not accepted (with Envoy's word on a rejection).
    for r in routes:
        for p in (r.get("status") or {}).get("parents") or []:
            for cond in p.get("conditions") or []:
                if cond.get("type") in ("Accepted", "ResolvedRefs") and cond.get("status") == "False":
                    meta = r["metadata"]
                    print(f"  ! {r['kind']} {meta['namespace']}/{meta['name']}: {cond['type']}="
                          f"False ({cond.get('reason')}): {cond.get('message')}")
    for n in cfg.nodes:
        try:
            st = AgentClient(cfg.agent_socket(n.name), n.name, timeout=2).get("/status")
        except NodemeshError:
            continue
        proxy = st.get("proxy") or {}
        envoy = proxy.get("envoy") or {}
        if proxy:
            print(f"proxy {n.name}: Envoy pid {envoy.get('pid')}, xDS {proxy.get('xds', {}).get('state')}"
                  + (f", REJECTED: {proxy['nack']['message']}" if proxy.get("nack") else "")
                  + (f", hot-restart epoch {envoy['epoch']}" if envoy.get("epoch") else "")
                  + "".join(f", pid {p} draining" for p in envoy.get("draining") or [])
                  + _envoy_exit_text(envoy))
        print("\n".join(_tables_lines(n.name, st)), end="")
    return 0


def _store_line(cfg: ClusterConfig) -> str:
    if cfg.store_type == "sqlite":
        return f"sqlite ({os.path.join(cfg.state_dir, 'store.db')})"
    if cfg.store_members:
        return (f"etcd, {len(cfg.store_members)} member(s) on the underlay, TLS "
                f"(client certificate {cfg.store['cert']})")
    return f"etcd at {', '.join(cfg.store['endpoints'])} (run by you), TLS"


def _print_store_members(cfg: ClusterConfig) -> None:
    """The etcd endpoints' health and leader, asked with etcdctl from the underlay's namespace
    (the cluster's own members) or from here (an etcd the user runs)."""
    from nodemesh.cluster.etcdmembers import health, member_ref

    rows = []
    for e in health(cfg.store):
        name = e.get("name")
        if name:
            ref = member_ref(cfg, name)
            rec = read_json(os.path.join(cfg.etcd_dir, name, "member.json")) or {}
            pid = f"pid {ref.pid}" if ref else "not running"
            restarts = str(rec.get("restarts", 0))
        else:
            pid, restarts = "-", "-"
        rows.append([name or "-", e["endpoint"], e.get("netns", "-"), pid,
                     "healthy" if e["healthy"] else "unhealthy" + (f" ({e['error']})" if e["error"]
                                                                    else ""),
                     "yes" if e["leader"] else "no", restarts])
    print()
    print(output.table(["MEMBER", "ENDPOINT", "NETNS", "PROCESS", "HEALTH", "LEADER",
                        "RESTARTS"], rows))


def _tables_lines(node: str, st: dict) -> list[str]:
    """Full maps and lost flow events of one node's agent /status, each a line (or none)."""
    out = [f"  ! {node}: {r['message']}\n"
           for r in (st.get("datapath") or {}).get("tablesFull") or []]
    flows = st.get("flows") or {}
    if flows.get("lostEvents") or flows.get("overwritten"):
        out.append(f"flows {node}: {flows.get('lostEvents', 0)} events lost (the nm_events ring "
                   f"buffer was full), {flows.get('overwritten', 0)} overwritten in the agent's "
                   f"flow ring of {flows.get('capacity')}\n")
    if flows.get("suppressedEvents"):
        out.append(f"flows {node}: {flows['suppressedEvents']} events suppressed (a source over "
                   "its event budget; its packets are still counted in nodemesh_drops_total and "
                   "nodemesh_l4_packets)\n")
    return out


def _envoy_exit_text(envoy: dict) -> str:
    """", restarted 1 time (pid 4242 killed by SIGKILL at ..., back after 180 ms)"."""
    exits = envoy.get("exits") or []
    if not envoy.get("restarts") or not exits:
        return ""
    n, last = envoy["restarts"], exits[-1]
    back = (f"back after {last['downMs']:.0f} ms" if last.get("downMs") is not None
            else "NOT BACK YET")
    return (f", restarted {n} time{'s' if n != 1 else ''} (last: pid {last['pid']} "
            f"{last['how']} at {last['at']}, {back})")


# ---- apply / delete ------------------------------------------------------------------------
def cmd_apply(args: argparse.Namespace) -> int:
    objs = load_and_validate(args.filename, args.namespace)
    _, store = _store(args)
    print("\n".join(apply_objects(store, objs)))
    return 0


def _request_deletes(t: Txn, targets: list[tuple[str, str, str]]
                     ) -> tuple[list[tuple[str, str, str, str]], list[str]]:
    """Mark `targets` deleted in `t`: (pods to wait for, references of the missing)."""
    waiting: list[tuple[str, str, str, str]] = []
    missing = []
    for kind, ns, name in targets:
        obj = t.get(kind, ns, name)
        if obj is None:
            missing.append(ref(kind, ns, name))
            continue
        if kind in ("Node", "Identity"):
            raise NodemeshError(f"{ref(kind, ns, name)} is managed by nodemesh and can not be "
                                "deleted", 2)
        request_delete(t, obj)
        if kind == "Pod" and obj["spec"].get("nodeName"):
            waiting.append((kind, ns, name, obj["metadata"]["uid"]))
        if kind == "Namespace":
            for p in t.list("Pod", name):
                waiting.append(("Pod", name, p["metadata"]["name"], p["metadata"]["uid"]))
    return waiting, missing


def cmd_delete(args: argparse.Namespace) -> int:
    _cfg, store = _store(args)
    targets: list[tuple[str, str, str]] = []
    if args.filename:
        from nodemesh.model.manifest import load_manifests, read_manifest_paths

        for source, text in read_manifest_paths(args.filename):
            for d in load_manifests(text, source):
                info = _kind(str(d.get("kind")))
                meta = d.get("metadata") or {}
                ns = (meta.get("namespace") or _namespace(args)) if info.namespaced else ""
                targets.append((info.kind, ns, str(meta.get("name"))))
    elif args.kind and args.names:
        info = _kind(args.kind)
        ns = _namespace(args) if info.namespaced else ""
        targets = [(info.kind, ns, n) for n in args.names]
    else:
        raise NodemeshError("delete needs -f FILE, or KIND and NAME "
                            "(e.g. `nodemesh delete pod web-1`)", 2)
    for attempt in store.retrying():  # on etcd, a race with an agent's write: run it again
        with attempt as t:
            waiting, missing = _request_deletes(t, targets)
    for kind, ns, name in targets:
        if ref(kind, ns, name) not in missing:
            print(f'{kind.lower()} "{name}" deleted')
    if args.wait and waiting:
        deadline = time.monotonic() + args.timeout
        for kind, ns, name, uid in waiting:
            while True:
                cur = store.get(kind, ns, name)
                if cur is None or cur["metadata"]["uid"] != uid:
                    break
                if time.monotonic() > deadline:
                    raise NodemeshError(f"timed out after {args.timeout:.0f}s waiting for "
                                        f"{ref(kind, ns, name)} to go; is the agent of "
                                        f"{cur['spec'].get('nodeName')} running? "
                                        "(`nodemesh status`)")
                time.sleep(0.05)
    if missing and not args.ignore_not_found:
        raise NotFound("not found: " + ", ".join(missing))
    return 0


# ---- get / describe ------------------------------------------------------------------------
def _fetch(store: Store, info: KindInfo, args: argparse.Namespace) -> list[dict]:
    ns = None if (getattr(args, "all_namespaces", False) or not info.namespaced) else _namespace(args)
    objs = store.list(info.kind, ns)
    if getattr(args, "selector", None):
        from nodemesh.model.labels import selector_matches

        sel = parse_selector(args.selector)
        objs = [o for o in objs if selector_matches(sel, o["metadata"].get("labels") or {})]
    return objs


CERT_KINDS = ("certificates", "certificate", "certs", "cert")


def _node_certificates(cfg: ClusterConfig) -> list[dict]:
    """What every node's agent holds: {node, mtls, certificates: [...]} (down agents: error)."""
    from nodemesh.cluster.agentclient import AgentClient

    out = []
    for n in cfg.nodes:
        try:
            out.append(AgentClient(cfg.agent_socket(n.name), n.name, timeout=3)
                       .get("/certificates"))
        except NodemeshError as e:
            out.append({"node": n.name, "error": e.message, "certificates": []})
    return out


def cmd_get_certificates(args: argparse.Namespace) -> int:
    """`get certificates`: the workload certificates each node holds (no keys)."""
    import json

    cfg, _ = _store(args)
    nodes = _node_certificates(cfg)
    if args.output == "json":
        print(json.dumps({"items": nodes}, indent=2))
        return 0
    if not cfg.mtls:
        print("mutual TLS is off in this cluster (nodemesh up --mtls off)", file=sys.stderr)
        return 0
    rows = []
    for n in nodes:
        if n.get("error"):
            rows.append([n["node"], "<agent unavailable>", "", "", "", n["error"]])
        for c in n.get("certificates") or []:
            left = float(c.get("expiresInSeconds", 0))
            rows.append([n["node"], c["spiffeId"], c["serial"][:16], c["notAfter"],
                         output.duration_text(left) if left > 0 else "EXPIRED",
                         c.get("issuer", "")[:16]])
    if not rows:
        print("No certificates (no pods yet).", file=sys.stderr)
        return 0
    print(output.table(["NODE", "IDENTITY", "SERIAL", "EXPIRES", "IN", "ISSUER"], rows))
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    if args.kind.lower() in CERT_KINDS:
        return cmd_get_certificates(args)
    _, store = _store(args)
    kinds = ([KINDS["Pod"], KINDS["Service"], KINDS["Deployment"]] if args.kind == "all"
             else [_kind(args.kind)])
    first = True
    for info in kinds:
        if args.name:
            ns = _namespace(args) if info.namespaced else ""
            obj = store.get(info.kind, ns, args.name)
            if obj is None:
                raise NotFound(f"{ref(info.kind, ns or None, args.name)} not found")
            output.print_objects(output.Single([obj]), info.kind, args.output, False,
                                 info.namespaced)
            continue
        objs = _fetch(store, info, args)
        if not objs:
            if args.output not in ("yaml", "json") and len(kinds) == 1:
                where = "" if not info.namespaced or args.all_namespaces else \
                    f" in {_namespace(args)} namespace"
                print(f"No resources found{where}.", file=sys.stderr)
                continue
            if len(kinds) > 1:
                continue
        if len(kinds) > 1 and not first:
            print()
        first = False
        output.print_objects(objs, info.kind, args.output, args.all_namespaces, info.namespaced)
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from nodemesh.cli.describe import describe

    cfg, store = _store(args)
    info = _kind(args.kind)
    ns = _namespace(args) if info.namespaced else ""
    obj = store.get(info.kind, ns, args.name)
    if obj is None:
        raise NotFound(f"{ref(info.kind, ns or None, args.name)} not found")
    mesh = _pod_mesh(cfg, obj) if info.kind == "Pod" else None
    print(describe(obj, store, mesh))
    return 0


def _pod_mesh(cfg: ClusterConfig, pod: dict) -> dict | None:
    """A pod's workload identity and the certificate its node holds for it."""
    from nodemesh.certs.spiffe import spiffe_id
    from nodemesh.cluster.agentclient import AgentClient

    if not cfg.mtls:
        return {"mtls": False}
    spec = pod.get("spec") or {}
    sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    ident = spiffe_id(cfg.trust_domain, pod["metadata"]["namespace"], sa)
    out: dict = {"mtls": True, "serviceAccount": sa, "spiffeId": ident}
    node = spec.get("nodeName")
    if node:
        try:
            st = AgentClient(cfg.agent_socket(node), node, timeout=3).get("/certificates")
            out["certificate"] = next((c for c in st.get("certificates") or []
                                       if c["spiffeId"] == ident), None)
        except NodemeshError as e:
            out["error"] = e.message
    return out


# ---- exec / logs ---------------------------------------------------------------------------
def _running_pod(args: argparse.Namespace) -> tuple[ClusterConfig, dict, dict]:
    cfg, store = _store(args)
    ns = _namespace(args)
    pod = store.get("Pod", ns, args.pod)
    if pod is None:
        raise NotFound(f"Pod {ns}/{args.pod} not found (pods in {ns}: "
                       f"{', '.join(p['metadata']['name'] for p in store.list('Pod', ns)) or 'none'})")
    spec = read_json(os.path.join(cfg.pod_dir(pod["metadata"]["uid"]), "spec.json"))
    if spec is None:
        raise NodemeshError(f"Pod {ns}/{args.pod} has not started yet "
                            f"(status: {output.pod_status_text(pod)})")
    return cfg, pod, spec


def _container(spec: dict, pod: dict, name: str | None) -> dict:
    names = [c["name"] for c in spec["containers"]]
    if name is None:
        return spec["containers"][0]
    for c in spec["containers"]:
        if c["name"] == name:
            return c
    raise NodemeshError(f"container {name!r} is not in Pod {pod['metadata']['namespace']}/"
                        f"{pod['metadata']['name']} (containers: {', '.join(names)})", 2)


def cmd_exec(args: argparse.Namespace) -> int:
    _require_root("nodemesh exec")
    cfg, pod, spec = _running_pod(args)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise NodemeshError("exec needs a command after --, e.g. "
                            f"`nodemesh exec {args.pod} -- curl -s http://web/`", 2)
    state = read_json(os.path.join(cfg.pod_dir(pod["metadata"]["uid"]), "state.json")) or {}
    shim = ProcRef.from_json(state.get("shim"))
    if shim is None or not shim.alive():
        raise NodemeshError(f"Pod {pod['metadata']['namespace']}/{pod['metadata']['name']} is not "
                            f"running (status: {output.pod_status_text(pod)})")
    container = _container(spec, pod, args.container)
    run = {"cmd": cmd, "env": container["env"], "cwd": container.get("cwd") or "/",
           "cgroup": spec["cgroup"], "shim_pid": shim.pid}
    if cfg.store.get("type") == "etcd":
        execin.exec_fresh(run)  # (no fork of a process that has used gRPC)
    return execin.run(run)


def cmd_logs(args: argparse.Namespace) -> int:
    cfg, pod, spec = _running_pod(args)
    container = _container(spec, pod, args.container)
    path = os.path.join(cfg.pod_dir(pod["metadata"]["uid"]), "logs", f"{container['name']}.log")
    if args.previous:
        path += ".previous"
        if not os.path.exists(path):
            raise NodemeshError(f"container {container['name']!r} has not been restarted: no "
                                "previous output")
    try:
        f = open(path, "rb")  # noqa: SIM115 - followed below
    except FileNotFoundError:
        return 0
    with f:
        data = f.read()
        if args.tail >= 0:
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-args.tail:]) if args.tail else b""
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        while args.follow:
            chunk = f.read()
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            else:
                time.sleep(0.1)
    return 0


# ---- daemons -------------------------------------------------------------------------------
def cmd_agent(args: argparse.Namespace) -> int:
    """`agent --node N` runs a node's agent (the daemon does that); `agent hold --node N`
    keeps the daemon from starting it again when it exits (for taking a node out: kill the
    agent, and its lease lapses); `agent release --node N` lets the daemon start it."""
    from nodemesh.agent.main import run_agent

    if args.kubernetes:
        from nodemesh.agent.kubernetes import run_kubernetes_agent
        from nodemesh.cluster.config import state_dir_from

        _require_root("nodemesh agent --kubernetes")
        return run_kubernetes_agent(args.node, args.config, state_dir_from(args.state_dir),
                                    args.kubeconfig, args.pods)
    if not args.node:
        raise NodemeshError("nodemesh agent: --node is required (without --kubernetes)", 2)
    _require_root("nodemesh agent")
    cfg = _cluster(args)
    if args.action is None:
        return run_agent(cfg, args.node)
    cfg.node(args.node)  # (an unknown node is an error naming the nodes)
    path = cfg.agent_hold_file(args.node)
    if args.action == "hold":
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(now_rfc3339() + "\n")
        print(f"agent of {args.node} held: the daemon does not start it again when it exits "
              f"(`nodemesh agent release --node {args.node}` lets it)")
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        print(f"agent of {args.node} released: the daemon starts it if it is not running")
    return 0


def cmd_daemon(args: argparse.Namespace) -> int:
    from nodemesh.cluster.daemon import run_daemon

    _require_root("nodemesh daemon")
    return run_daemon(_cluster(args))


def cmd_cni_config(args: argparse.Namespace) -> int:
    """A CNI network configuration list for one node: ptp + host-local, then nodemesh-cni."""
    import json

    from nodemesh.cluster import ipam
    from nodemesh.cni.conf import chain_config

    cfg = _cluster(args)
    node = cfg.node(args.node)
    reserved = ipam.cni_range(node.pod_cidr)
    if reserved is None:
        raise NodemeshError(f"node {node.name}: pod CIDR {node.pod_cidr} is too small to leave "
                            "a range to CNI")
    pod = None
    if args.pod:
        ns, sep, name = args.pod.rpartition("/")
        if not name:
            raise NodemeshError(f"--pod {args.pod!r}: expected NAMESPACE/NAME")
        pod = (ns if sep else "default", name)
    conf = chain_config(network=args.network, pod_cidr=node.pod_cidr, address_range=reserved,
                        gateway=ipam.gateway(node.pod_cidr),
                        agent_socket=cfg.agent_socket(node.name),
                        ipam_dir=os.path.join(cfg.node_dir(node.name), "cni-ipam"), pod=pod)
    print(json.dumps(conf, indent=2))
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"nodemesh {__version__}")
    return 0



# ---- observe ---------------------------------------------------------------------------------
def _flow_filter(args: argparse.Namespace):
    from nodemesh.observe.filters import FlowFilter, parse_time

    flt = FlowFilter(
        pod=args.pod, from_pod=args.from_pod, to_pod=args.to_pod, namespace=args.flow_namespace,
        label=args.label, from_label=args.from_label, to_label=args.to_label,
        service=args.service, to_service=args.to_service, verdict=args.verdict, type=args.type,
        protocol=args.protocol, http_status=args.http_status, http_method=args.http_method,
        http_path=args.http_path, identity=args.identity,
        since=parse_time(args.since) if args.since else None,
        until=parse_time(args.until) if args.until else None)
    flt.validate()
    return flt


def cmd_observe(args: argparse.Namespace) -> int:
    import queue
    import threading

    from nodemesh.cli import printer
    from nodemesh.cluster.agentclient import AgentClient

    cfg = _cluster(args)
    flt = _flow_filter(args)
    nodes = [n.name for n in cfg.nodes if not args.node or n.name in args.node]
    colour = args.output == "compact" and sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    last = args.last if args.last is not None else (0 if args.follow else 20)

    def emit(flow: dict) -> None:
        if args.output == "json":
            print(printer.as_json(flow), flush=True)
        else:
            print(printer.compact(flow, colour), flush=True)

    query = flt.to_query()
    flows: list[dict] = []
    for node in nodes:
        client = AgentClient(cfg.agent_socket(node), node)
        flows += client.get("/flows", {**query, "last": [str(last)] if last else ["0"]})
    flows.sort(key=lambda f: f.get("time", ""))
    if last:
        flows = flows[-last:]
    if args.output == "table" and not args.follow:
        print(printer.as_table(flows))
        return 0
    for f in flows:
        emit(f)
    if not args.follow:
        return 0
    q: queue.Queue = queue.Queue(10000)

    def pump(node: str) -> None:
        client = AgentClient(cfg.agent_socket(node), node, timeout=None)
        try:
            for f in client.stream("/flows", {**query, "follow": ["1"]}):
                q.put(f)
        except Exception as e:  # an agent restart ends its stream; say so and keep the others
            q.put({"_error": f"node {node}: flow stream ended ({e})"})

    for node in nodes:
        threading.Thread(target=pump, args=(node,), daemon=True).start()
    while True:
        f = q.get()
        if "_error" in f:
            print(f"warning: {f['_error']}", file=sys.stderr)
            continue
        emit(f)


# ---- demo, ui, bench -------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from nodemesh.demo.run import run_demo

    _require_root("nodemesh demo")
    report = run_demo(_state_dir(args), args.requests)
    if args.output == "json":
        import json

        print(json.dumps(report, indent=2))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from nodemesh.ui.server import main as ui_main

    _cluster(args)  # a clear error when there is no cluster
    return ui_main(["--state-dir", _state_dir(args), "--address", args.address,
                    "--port", str(args.port), "--window", str(args.window)])


def _mtls_status_line(cfg: ClusterConfig, store: Store) -> str:
    """mTLS on or off; the CA's root and its expiry; how many certificates each node holds."""
    from nodemesh.certs.client import CaClient

    if not cfg.mtls:
        return "off (pod traffic crosses the underlay in clear)"
    try:
        root = CaClient(cfg.ca_socket, timeout=2).status()["activeRoot"]
        ca = f"CA root {root['fingerprint'][:12]} until {root['notAfter']}"
    except NodemeshError as e:
        ca = f"CA unavailable ({e.message})"
    counts = []
    for n in cfg.nodes:
        node = store.get("Node", "", n.name) or {}
        mesh = (node.get("status") or {}).get("mesh") or {}
        counts.append(f"{n.name} {mesh.get('certificates', 0)}")
    return (f"on, trust domain {cfg.trust_domain}, {ca}; certificates: " + ", ".join(counts))


def cmd_ca(args: argparse.Namespace) -> int:
    """`ca status`: the cluster CA and what each node holds; `ca rotate`: a new root, with no
    failed connection (docs/security.md, "Rotation")."""
    import json

    from nodemesh.certs.client import CaClient
    from nodemesh.cluster.trust import BUNDLE_NAME

    cfg, store = _store(args)
    if not cfg.mtls:
        raise NodemeshError("mutual TLS is off in this cluster (nodemesh up --mtls off): "
                            "it has no certificate authority", 1)
    if args.what == "status":
        st = CaClient(cfg.ca_socket).status()
        bundle = store.get("TrustBundle", "", BUNDLE_NAME) or {}
        st["bundle"] = {"roots": len((bundle.get("spec") or {}).get("roots") or []),
                        "phase": ((bundle.get("spec") or {}).get("rotation") or {}).get("phase"),
                        "lastRotation": (bundle.get("status") or {}).get("lastRotation")}
        st["nodes"] = {n["node"]: len(n.get("certificates") or [])
                       for n in _node_certificates(cfg)}
        print(json.dumps(st, indent=2) if args.output == "json" else _ca_text(st))
        return 0
    _require_root("nodemesh ca rotate")
    if lifecycle.daemon_ref(cfg) is None:
        raise NodemeshError("the cluster daemon is not running (it carries out rotations): "
                            "run `nodemesh up`", 1)
    before = CaClient(cfg.ca_socket).status()["activeRoot"]["fingerprint"]
    requested = now_rfc3339()
    with store.transaction() as t:
        cur = t.get("TrustBundle", "", BUNDLE_NAME)
        if cur is None:
            raise NodemeshError("no trust bundle in the store yet (is the daemon starting?)", 1)
        phase = ((cur.get("spec") or {}).get("rotation") or {}).get("phase", "idle")
        if phase != "idle":
            raise NodemeshError(f"a rotation is under way already (phase {phase})", 1)
        obj = {k: v for k, v in cur.items() if k != "status"}
        obj["spec"] = {**cur["spec"], "rotate": requested}
        t.put(obj)
    print(f"rotation requested; old root {before[:16]}")
    if not args.wait:
        return 0
    deadline = time.monotonic() + args.timeout
    seen = ""
    while time.monotonic() < deadline:
        cur = store.get("TrustBundle", "", BUNDLE_NAME) or {}
        spec = cur.get("spec") or {}
        phase = (spec.get("rotation") or {}).get("phase", "")
        if phase != seen:
            seen = phase
            text = {"prepared": "new root prepared: nodes are taking it into their trust bundle",
                    "rotating": "every node trusts the new root: it signs now; nodes renew",
                    "idle": "every node renewed: the old root is retired"}.get(phase, phase)
            if phase != "idle" or spec.get("signing") != before:
                print(f"  {text}")
        if phase == "idle" and spec.get("signing") != before and not spec.get("rotate"):
            print(f"rotated: new root {spec['signing'][:16]}")
            return 0
        time.sleep(0.2)
    raise NodemeshError(f"the rotation did not finish within {args.timeout:g}s (phase {seen}); "
                        f"see {os.path.join(cfg.state_dir, 'daemon.log')}", 1)


def _ca_text(st: dict) -> str:
    root = st.get("activeRoot") or {}
    lines = [f"trust domain: {st.get('trustDomain')}",
             f"CA:           {st.get('kind')} ({st.get('directory')})",
             f"active root:  {root.get('subject')}, {root.get('fingerprint', '')[:16]}",
             f"              valid {root.get('notBefore')} .. {root.get('notAfter')}",
             f"bundle:       {st['bundle']['roots']} root(s), rotation "
             f"{st['bundle']['phase'] or 'idle'}"
             + (f", last rotation {st['bundle']['lastRotation']}"
                if st["bundle"].get("lastRotation") else ""),
             "certificates: " + ", ".join(f"{n} {c}" for n, c in sorted(st["nodes"].items()))]
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> int:
    """Hand every word after `bench` to the benchmark's own parser (it answers --help, refuses
    unknown options with exit code 2 and checks for root itself, after --render)."""
    from nodemesh.bench import main as bench_main

    if getattr(args, "state_dir", None):
        raise NodemeshError("nodemesh bench brings up clusters of its own, each in a private "
                            "state directory: --state-dir does not apply to it", 2)
    bench_args = list(args.bench_args)
    if bench_args[:1] == ["--"]:  # `nodemesh bench -- --quick`
        bench_args = bench_args[1:]
    return bench_main(bench_args)


def cmd_proxy(args: argparse.Namespace) -> int:
    import json

    from nodemesh.cluster.agentclient import AgentClient

    cfg = _cluster(args)
    nodes = [n.name for n in cfg.nodes if args.node in (None, n.name)]
    if not nodes:
        raise NodemeshError(f"no node named {args.node!r}", 2)
    if args.what == "restart":
        from nodemesh.proxy.envoy import HotRestart

        if not HotRestart.times_ok(args.drain_seconds, args.parent_shutdown_seconds):
            raise NodemeshError("proxy restart: need 0 <= --drain-seconds <= "
                                f"--parent-shutdown-seconds <= {HotRestart.MAX_SECONDS}", 2)
        for node in nodes:  # one node at a time, as a rolling upgrade would
            r = AgentClient(cfg.agent_socket(node), node, timeout=60).post(
                "/proxy/restart", {"drainSeconds": args.drain_seconds,
                                   "parentShutdownSeconds": args.parent_shutdown_seconds})
            ready = "" if r["ready"] else " (NOT READY: it has not acknowledged the listeners)"
            print(f"{node}: Envoy pid {r['oldPid']} -> pid {r['newPid']} (hot restart epoch "
                  f"{r['epoch']}, {r['tookMs']:.0f} ms){ready}; pid {r['oldPid']} drains for "
                  f"{r['drainSeconds']} s and exits within {r['parentShutdownSeconds']} s")
        return 0
    for node in nodes:
        client = AgentClient(cfg.agent_socket(node), node, timeout=30)
        data = client.get(f"/proxy/{args.what}", {"filter": [args.filter]} if args.filter else None)
        if args.what == "stats":
            for name, value in sorted(data.items()):
                print(f"{node}  {name}: {value}")
        else:
            print(json.dumps({"node": node, args.what: data}, indent=1))
    return 0
