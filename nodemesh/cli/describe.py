"""`nodemesh describe`: one resource in detail, in kubectl's "Key:  value" layout."""

from __future__ import annotations

from nodemesh.cli import output
from nodemesh.store import Store


def _kv(rows: list[tuple[str, object]], indent: int = 0) -> list[str]:
    # One width for every block, so the whole description lines up as kubectl's does.
    width = max([18, *(len(k) + 2 for k, _ in rows)])
    return [" " * indent + f"{k + ':':<{width}}{v}" for k, v in rows]


def _labels(d: dict | None) -> str:
    if not d:
        return "<none>"
    return "\n".join((" " * 18 if i else "") + f"{k}={v}" for i, (k, v) in enumerate(sorted(d.items())))


def _conditions(conds: list[dict] | None, indent: int = 2) -> list[str]:
    if not conds:
        return [" " * indent + "<none>"]
    rows = [[c.get("type", ""), c.get("status", ""), c.get("reason", ""), c.get("message", "")]
            for c in conds]
    return [" " * indent + line for line in
            output.table(["TYPE", "STATUS", "REASON", "MESSAGE"], rows).splitlines()]


def _mesh_rows(spec: dict, mesh: dict) -> list[tuple[str, object]]:
    """The pod's workload identity and its certificate (mutual TLS)."""
    sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    if not mesh.get("mtls"):
        return [("Service Account", sa), ("Mutual TLS", "off (nodemesh up --mtls off)")]
    cert = mesh.get("certificate")
    if cert:
        left = float(cert.get("expiresInSeconds", 0))
        when = f"in {output.duration_text(left)}" if left > 0 else "EXPIRED"
        cert_text = f"serial {cert['serial'][:16]}, expires {cert['notAfter']} ({when})"
    elif mesh.get("error"):
        cert_text = f"<unknown: {mesh['error']}>"
    else:
        cert_text = "<none on its node yet>"
    return [("Service Account", sa), ("Workload ID", mesh.get("spiffeId")),
            ("Certificate", cert_text)]


def describe(obj: dict, store: Store, mesh: dict | None = None) -> str:
    meta = obj["metadata"]
    kind = obj["kind"]
    lines = _kv([("Name", meta["name"])] +
                ([("Namespace", meta["namespace"])] if meta.get("namespace") else []) +
                [("Labels", _labels(meta.get("labels"))),
                 ("Annotations", _labels(meta.get("annotations"))),
                 ("Created", f"{meta.get('creationTimestamp')} "
                             f"({output.age(meta.get('creationTimestamp'))} ago)"),
                 ("UID", meta.get("uid")),
                 ("Generation", meta.get("generation"))])
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    if kind == "Pod":
        sb = status.get("sandbox") or {}
        lines += _kv([("Node", f"{spec.get('nodeName') or '<none>'}/{status.get('hostIP', '')}"),
                      ("Status", output.pod_status_text(obj)),
                      ("IP", status.get("podIP") or "<none>"),
                      ("Network NS", sb.get("netns") or "<none>"),
                      ("Host veth", sb.get("hostInterface") or "<none>"),
                      ("Cgroup", sb.get("cgroup") or "<none>"),
                      ("Shim PID", sb.get("shimPID") or "<none>")])
        if status.get("message"):
            lines += _kv([("Reason", status.get("reason")), ("Message", status.get("message"))])
        if mesh is not None:
            lines += _kv(_mesh_rows(spec, mesh))
        lines.append("Containers:")
        st_by_name = {c["name"]: c for c in status.get("containerStatuses") or []}
        for c in spec.get("containers") or []:
            st = st_by_name.get(c["name"], {})
            state = st.get("state") or {}
            state_text = next(iter(state), "waiting").capitalize()
            detail = next(iter(state.values()), {}) if state else {}
            rows = [("Image", c.get("image")),
                    ("Command", " ".join(c.get("command") or []) or "<image default>"),
                    ("Args", " ".join(c.get("args") or []) or "<none>"),
                    ("Ports", ", ".join(f"{p['containerPort']}/{p.get('protocol', 'TCP')}"
                                        + (f" ({p['name']})" if p.get("name") else "")
                                        for p in c.get("ports") or []) or "<none>"),
                    ("State", state_text + "".join(f"\n{' ' * 18}{k}: {v}" for k, v in detail.items())),
                    ("Ready", st.get("ready", False)),
                    ("Restart Count", st.get("restartCount", 0)),
                    ("PID", (st.get("containerID") or "").replace("process://", "") or "<none>")]
            last = (st.get("lastState") or {}).get("terminated")
            if last:
                rows.append(("Last State", f"Terminated, exit code {last.get('exitCode')} "
                                           f"({last.get('reason')}) at {last.get('finishedAt')}"))
            lines.append(f"  {c['name']}:")
            lines += _kv(rows, 4)
        lines.append("Conditions:")
        lines += _conditions(status.get("conditions"))
    elif kind == "Service":
        pods = [p for p in store.list("Pod", meta["namespace"])]
        from nodemesh.model.labels import service_selects

        sel = spec.get("selector")
        backends = [p for p in pods if service_selects(sel, p["metadata"].get("labels") or {})]
        lines += _kv([("Selector", ",".join(f"{k}={v}" for k, v in (sel or {}).items()) or "<none>"),
                      ("Type", spec.get("type", "ClusterIP")),
                      ("IP", spec.get("clusterIP")),
                      ("Session Affinity", spec.get("sessionAffinity", "None")),
                      ("LB Algorithm", (meta.get("annotations") or {}).get(
                          "service.cilium.io/lb-algorithm", "random"))])
        for p in spec.get("ports") or []:
            lines += _kv([("Port", f"{p.get('name') or '<unset>'}  {p['port']}/{p.get('protocol', 'TCP')}"),
                          ("TargetPort", p.get("targetPort", p["port"]))])
        lines += _kv([("Endpoints", ", ".join(
            f"{(p.get('status') or {}).get('podIP')} ({p['metadata']['name']}"
            + ("" if output.pod_ready_text(p).split('/')[0] == output.pod_ready_text(p).split('/')[1]
               else ", not ready") + ")"
            for p in backends if (p.get("status") or {}).get("podIP")) or "<none>")])
    elif kind == "Deployment":
        lines += _kv([("Replicas", f"{spec.get('replicas', 1)} desired | "
                                   f"{status.get('updatedReplicas', 0)} updated | "
                                   f"{status.get('replicas', 0)} total | "
                                   f"{status.get('availableReplicas', 0)} available | "
                                   f"{status.get('unavailableReplicas', 0)} unavailable")])
        pods = [p for p in store.list("Pod", meta["namespace"])
                if any(r.get("uid") == meta["uid"] for r in p["metadata"].get("ownerReferences") or [])]
        lines.append("Pods:")
        rows = [[p["metadata"]["name"], output.pod_status_text(p),
                 (p.get("status") or {}).get("podIP") or "<none>", p["spec"].get("nodeName") or "<none>"]
                for p in pods]
        lines += ["  " + line for line in output.table(["NAME", "STATUS", "IP", "NODE"], rows).splitlines()]
    elif kind == "Node":
        lines += _kv([("Pod CIDR", spec.get("podCIDR")),
                      ("Addresses", ", ".join(f"{a['type']}={a['address']}"
                                              for a in status.get("addresses") or [])),
                      ("Taints", ", ".join(f"{t['key']}:{t.get('effect', '')}"
                                           for t in spec.get("taints") or []) or "<none>")])
        lines.append("Conditions:")
        lines += _conditions(status.get("conditions"))
    if kind in ("HTTPRoute", "GRPCRoute") or "parents" in status:
        lines.append("Status:")
        for p in status.get("parents") or []:
            ref = p.get("parentRef") or {}
            lines.append(f"  Parent: Service {ref.get('namespace', meta.get('namespace'))}/"
                         f"{ref.get('name')}" + (f" port {ref['port']}" if ref.get("port") else ""))
            lines += _conditions(p.get("conditions"), 4)
        if not status.get("parents"):
            lines.append("  <not yet processed by an agent>")
    if kind == "EndpointSlice":
        lines += _kv([("AddressType", obj.get("addressType")),
                      ("Ports", ", ".join(f"{p.get('name') or '<unset>'} {p.get('port')}/"
                                          f"{p.get('protocol', 'TCP')}"
                                          for p in obj.get("ports") or []) or "<unset>")])
        lines.append("Endpoints:")
        rows = [[", ".join(e.get("addresses") or []),
                 "false" if (e.get("conditions") or {}).get("ready") is False else "true",
                 e.get("nodeName") or "<unset>",
                 (e.get("targetRef") or {}).get("name") or "<unset>"]
                for e in obj.get("endpoints") or []]
        lines += ["  " + line for line in
                  output.table(["ADDRESSES", "READY", "NODE", "TARGET"], rows).splitlines()]
    if kind not in ("Pod", "Service", "Deployment", "Node", "EndpointSlice"):
        lines.append("Spec:")
        lines += ["  " + line for line in output.to_yaml(spec).splitlines()]
    if "conditions" in status and kind not in ("Pod", "Node"):
        lines.append("Conditions:")
        lines += _conditions(status.get("conditions"))
    return "\n".join(lines)
