"""Schemas of Pod and Deployment: the pod spec, containers, probes, env, and their rules.

Pods run as processes in a network namespace of their own (see nodemesh/cluster): there are no
volumes, no host namespaces, no init containers. Fields that need those are refused; fields that
only tune a real container runtime (resources, securityContext, imagePullPolicy ...) are accepted
and have no effect. docs/resources.md lists every decision.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from nodemesh.model.common import LABEL_SELECTOR, PORT, TEMPLATE_METADATA
from nodemesh.model.labels import selector_matches, validate_label_key
from nodemesh.model.names import (
    check_dns1123_label,
    check_dns1123_subdomain,
    check_http_header_name,
    check_iana_svc_name,
)
from nodemesh.model.schema import (
    Bool,
    Ctx,
    Hook,
    Int,
    IntOrStr,
    ListOf,
    MapOf,
    Obj,
    Path,
    Schema,
    Str,
    Unsupported,
    format_path,
    opt,
    req,
    type_name,
)

NO_VOLUMES = "pods run as processes on the node's filesystem; there are no volumes"
NO_CONFIG = "there are no ConfigMaps or Secrets in nodemesh"
NO_PLACEMENT = "nodemesh places pods itself; pin a pod to a node with spec.nodeName"

PROTOCOL = Str(enum=("TCP", "UDP"), unsupported={"SCTP": "nodemesh supports TCP and UDP"})

# -- env -------------------------------------------------------------------------------------

# Downward API fields the pod runtime fills in (nodemesh/cluster/pods.py).
FIELD_PATHS = ("metadata.name", "metadata.namespace", "metadata.uid", "spec.nodeName",
               "spec.serviceAccountName", "status.podIP", "status.hostIP")
_KEYED_FIELD = re.compile(r"metadata\.(labels|annotations)\['(.*)'\]")


def check_field_path(path: str) -> str | None:
    m = _KEYED_FIELD.fullmatch(path)
    if m:
        problem = validate_label_key(m.group(2))
        return f"invalid {m.group(1)[:-1]} key: {problem}" if problem else None
    if path in FIELD_PATHS:
        return None
    return (f'"{path}" is not supported by nodemesh (supported: {", ".join(FIELD_PATHS)}, '
            "metadata.labels['KEY'], metadata.annotations['KEY'])")


def check_env_name(name: str) -> str | None:
    # Kubernetes (since 1.30) allows any printable ASCII but '='.
    if not name:
        return "must not be empty"
    if "=" in name or any(not (32 <= ord(c) < 127) for c in name):
        return "must consist of printable ASCII characters other than '='"
    return None


def _env_var(env: dict, path: Path, ctx: Ctx) -> None:
    if "valueFrom" in env and env.get("value"):
        ctx.error((*path, "valueFrom"), "may not be set together with a non-empty value")


def _env_source(src: dict, path: Path, ctx: Ctx) -> None:
    if "fieldRef" not in src:
        ctx.error((*path, "fieldRef"), "required (nodemesh supports valueFrom.fieldRef only)")


ENV_VAR = Obj(
    {
        "name": req(Str(validator=check_env_name)),
        "value": Str(),
        "valueFrom": Obj(
            {
                "fieldRef": Obj({
                    "apiVersion": opt(Str(enum=("v1",)), "v1"),
                    "fieldPath": req(Str(validator=check_field_path)),
                }),
                "resourceFieldRef": Unsupported("container resources have no effect here"),
                "configMapKeyRef": Unsupported(NO_CONFIG),
                "secretKeyRef": Unsupported(NO_CONFIG),
                "fileKeyRef": Unsupported(NO_VOLUMES),
            },
            hooks=[_env_source],
        ),
    },
    hooks=[_env_var],
)

# -- probes ----------------------------------------------------------------------------------

PORT_OR_NAME = IntOrStr(PORT, Str(validator=check_iana_svc_name))
PROBE_HANDLERS = ("exec", "httpGet", "tcpSocket")


def _one_handler(probe: dict, path: Path, ctx: Ctx) -> None:
    present = [h for h in PROBE_HANDLERS if h in probe]
    if not present:
        ctx.error(path, "must set one of exec, httpGet or tcpSocket")
    elif len(present) > 1:
        ctx.error((*path, present[1]), f"may not be set together with {present[0]}")


PROBE = Obj(
    {
        "exec": Obj({"command": req(ListOf(Str(), min_items=1))}),
        "httpGet": Obj({
            "path": Str(),
            "port": req(PORT_OR_NAME),
            "host": Str(),
            "scheme": opt(Str(enum=("HTTP", "HTTPS")), "HTTP"),
            "httpHeaders": ListOf(Obj({
                "name": req(Str(validator=check_http_header_name)),
                "value": opt(Str(), ""),
            })),
        }),
        "tcpSocket": Obj({"port": req(PORT_OR_NAME), "host": Str()}),
        "grpc": Unsupported("probes may use exec, httpGet or tcpSocket"),
        # Kubernetes' defaults, filled so the runtime reads plain numbers.
        "initialDelaySeconds": opt(Int(0), 0),
        "timeoutSeconds": opt(Int(1), 1),
        "periodSeconds": opt(Int(1), 10),
        "successThreshold": opt(Int(1), 1),
        "failureThreshold": opt(Int(1), 3),
        "terminationGracePeriodSeconds": Int(1),
    },
    hooks=[Hook(_one_handler, needs=())],
)

# -- accepted, no effect ---------------------------------------------------------------------

_QUANTITY = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[numkMGTPE]|[KMGTPE]i)?")


class Quantity(Schema):
    """A resource quantity: ``500m``, ``1Gi``, ``2`` or ``0.5``."""

    def check(self, value: Any, path: Path, ctx: Ctx) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            ctx.error(path, f'must be a quantity such as "500m" or "1Gi" (got {type_name(value)})')
        elif isinstance(value, str) and not _QUANTITY.fullmatch(value):
            ctx.error(path, f'must be a quantity such as "500m" or "1Gi" (got "{value}")')
        return value


RESOURCES = Obj({
    "limits": MapOf(Quantity(), key_what="resource name"),
    "requests": MapOf(Quantity(), key_what="resource name"),
    "claims": Unsupported("there are no resource claims in nodemesh"),
})

_PROFILE = Obj({"type": req(Str(enum=("RuntimeDefault", "Unconfined", "Localhost"))),
                "localhostProfile": Str()})
_SELINUX = Obj({"user": Str(), "role": Str(), "type": Str(), "level": Str()})
_WINDOWS = Unsupported("nodemesh runs Linux processes")
_COMMON_SC: dict[str, Any] = {
    "appArmorProfile": _PROFILE,
    "seccompProfile": _PROFILE,
    "seLinuxOptions": _SELINUX,
    "runAsUser": Int(0),
    "runAsGroup": Int(0),
    "runAsNonRoot": Bool(),
    "windowsOptions": _WINDOWS,
}
CONTAINER_SECURITY_CONTEXT = Obj({
    **_COMMON_SC,
    "allowPrivilegeEscalation": Bool(),
    "capabilities": Obj({"add": ListOf(Str()), "drop": ListOf(Str())}),
    "privileged": Bool(),
    "procMount": Str(enum=("Default", "Unmasked")),
    "readOnlyRootFilesystem": Bool(),
})
POD_SECURITY_CONTEXT = Obj({
    **_COMMON_SC,
    "fsGroup": Int(0),
    "fsGroupChangePolicy": Str(enum=("OnRootMismatch", "Always")),
    "seLinuxChangePolicy": Str(enum=("MountOption", "Recursive")),
    "supplementalGroups": ListOf(Int(0)),
    "supplementalGroupsPolicy": Str(enum=("Merge", "Strict")),
    "sysctls": ListOf(Obj({"name": req(Str()), "value": req(Str())})),
})
TOLERATION = Obj({
    "key": Str(),
    "operator": Str(enum=("Exists", "Equal")),
    "value": Str(),
    "effect": Str(enum=("NoSchedule", "PreferNoSchedule", "NoExecute")),
    "tolerationSeconds": Int(),
})

# -- containers ------------------------------------------------------------------------------

CONTAINER_PORT = Obj({
    "name": Str(validator=check_iana_svc_name),
    "containerPort": req(PORT),
    "protocol": opt(PROTOCOL, "TCP"),
    "hostPort": Unsupported("pods are reached through their own IP or a Service", (0,)),
    "hostIP": Unsupported("pods are reached through their own IP or a Service"),
})


def _container_rules(c: dict, path: Path, ctx: Ctx) -> None:
    names = {p["name"] for p in c.get("ports", []) if "name" in p}
    for probe in ("readinessProbe", "livenessProbe"):
        spec = c.get(probe)
        if not isinstance(spec, dict):
            continue
        if probe == "livenessProbe" and spec.get("successThreshold", 1) != 1:
            ctx.error((*path, probe, "successThreshold"), "must be 1 for a liveness probe")
        for handler in ("httpGet", "tcpSocket"):
            port = (spec.get(handler) or {}).get("port")
            if isinstance(port, str) and port not in names:
                ctx.error((*path, probe, handler, "port"),
                          f'no port named "{port}" in this container\'s ports')


CONTAINER = Obj(
    {
        "name": req(Str(validator=check_dns1123_label)),
        "image": req(Str(min_len=1)),
        "command": ListOf(Str()),
        "args": ListOf(Str()),
        "workingDir": Str(),
        "ports": ListOf(CONTAINER_PORT),
        "env": ListOf(ENV_VAR),
        "envFrom": Unsupported(NO_CONFIG),
        "readinessProbe": PROBE,
        "livenessProbe": PROBE,
        "startupProbe": Unsupported("the runtime runs readinessProbe and livenessProbe only"),
        "lifecycle": Unsupported("postStart and preStop hooks are not run"),
        "volumeMounts": Unsupported(NO_VOLUMES),
        "volumeDevices": Unsupported(NO_VOLUMES),
        "restartPolicy": Unsupported("only the pod's restartPolicy applies; no sidecar containers"),
        "restartPolicyRules": Unsupported("only the pod's restartPolicy applies"),
        # Accepted, no effect: they tune a container runtime nodemesh does not have.
        "resources": RESOURCES,
        "resizePolicy": ListOf(Obj({
            "resourceName": req(Str()),
            "restartPolicy": req(Str(enum=("NotRequired", "RestartContainer"))),
        })),
        "securityContext": CONTAINER_SECURITY_CONTEXT,
        "imagePullPolicy": Str(enum=("Always", "IfNotPresent", "Never")),
        "terminationMessagePath": Str(),
        "terminationMessagePolicy": Str(enum=("File", "FallbackToLogsOnError")),
        "stdin": Bool(),
        "stdinOnce": Bool(),
        "tty": Bool(),
    },
    hooks=[Hook(_container_rules, needs=("ports", "readinessProbe", "livenessProbe"))],
)

# -- pod spec --------------------------------------------------------------------------------


def _unique_port_names(spec: dict, path: Path, ctx: Ctx) -> None:
    # Kubernetes requires port names to be unique across all containers of a pod.
    seen: dict[str, Path] = {}
    for i, c in enumerate(spec.get("containers", [])):
        for j, p in enumerate(c.get("ports", [])):
            name = p.get("name")
            if not name:
                continue
            here = (*path, "containers", i, "ports", j, "name")
            if name in seen:
                ctx.error(here, f'duplicate port name "{name}" (same as {format_path(seen[name])})')
            else:
                seen[name] = here


def check_service_account_name(value: str) -> str | None:
    """A ServiceAccount name, as Kubernetes validates it: a DNS-1123 subdomain. It becomes a path
    segment of the pod's SPIFFE ID, so anything else would make an ID no peer could match.
    Empty means "default", as in Kubernetes."""
    return check_dns1123_subdomain(value) if value else None


POD_SPEC = Obj(
    {
        "containers": req(ListOf(CONTAINER, min_items=1, unique=lambda c: c.get("name"),
                                 unique_msg="duplicate container name", unique_at="name")),
        "restartPolicy": opt(Str(enum=("Always", "OnFailure", "Never")), "Always"),
        "terminationGracePeriodSeconds": opt(Int(0), 30),
        "nodeName": Str(validator=check_dns1123_subdomain),
        # The pod's workload identity (spiffe://<td>/ns/<ns>/sa/<name>); the deprecated
        # serviceAccount is used when serviceAccountName is not set, as in Kubernetes.
        "serviceAccountName": Str(validator=check_service_account_name),
        "serviceAccount": Str(validator=check_service_account_name),
        # Accepted, no effect.
        "automountServiceAccountToken": Bool(),
        "securityContext": POD_SECURITY_CONTEXT,
        "imagePullSecrets": ListOf(Obj({"name": Str()})),
        "dnsPolicy": Str(enum=("ClusterFirst", "ClusterFirstWithHostNet", "Default", "None")),
        "enableServiceLinks": Bool(),
        "schedulerName": Str(),
        "priorityClassName": Str(),
        "priority": Int(),
        "preemptionPolicy": Str(enum=("PreemptLowerPriority", "Never")),
        "tolerations": ListOf(TOLERATION),
        "os": Obj({"name": req(Str(enum=("linux",),
                                   unsupported={"windows": "nodemesh runs Linux processes"}))}),
        "resources": RESOURCES,
        # Refused: nodemesh cannot honour them.
        "volumes": Unsupported(NO_VOLUMES),
        "initContainers": Unsupported("there are no init containers; run setup in the command"),
        "ephemeralContainers": Unsupported("there are no ephemeral containers"),
        "hostNetwork": Unsupported("every pod has a network namespace of its own"),
        "hostPID": Unsupported("every pod runs in the node's PID namespace, not the host's"),
        "hostIPC": Unsupported("pods do not share the host's IPC namespace"),
        "hostUsers": Unsupported("no user namespaces", (True,)),
        "shareProcessNamespace": Unsupported("containers are processes; there is no pause process"),
        "hostname": Unsupported("a pod's hostname is its name"),
        "subdomain": Unsupported("there is no cluster DNS for pod subdomains"),
        "setHostnameAsFQDN": Unsupported("a pod's hostname is its name"),
        "hostAliases": Unsupported("/etc/hosts is written by nodemesh"),
        "dnsConfig": Unsupported("/etc/resolv.conf is written by nodemesh"),
        "activeDeadlineSeconds": Unsupported("pods are not killed on a deadline"),
        "nodeSelector": Unsupported(NO_PLACEMENT),
        "affinity": Unsupported(NO_PLACEMENT),
        "topologySpreadConstraints": Unsupported(NO_PLACEMENT),
        "schedulingGates": Unsupported(NO_PLACEMENT),
        "readinessGates": Unsupported("only readiness probes decide readiness"),
        "runtimeClassName": Unsupported("there is one runtime: processes"),
        "overhead": Unsupported("there is one runtime: processes"),
        "resourceClaims": Unsupported("there are no resource claims in nodemesh"),
    },
    hooks=[Hook(_unique_port_names, needs=("containers",))],
)

# -- deployment ------------------------------------------------------------------------------

PERCENT_OR_INT = IntOrStr(
    Int(0), Str(pattern=r"\d+%", pattern_msg='must be a number or a percentage such as "25%"')
)


def _strategy(s: dict, path: Path, ctx: Ctx) -> None:
    ru = s.get("rollingUpdate")
    if ru is None:
        return
    if s.get("type") == "Recreate":
        ctx.error((*path, "rollingUpdate"), "may not be set when type is Recreate")
    if ru.get("maxUnavailable") in (0, "0%") and ru.get("maxSurge") in (0, "0%"):
        ctx.error((*path, "rollingUpdate", "maxUnavailable"),
                  "may not be 0 when maxSurge is 0")


def _deployment_selector(spec: dict, path: Path, ctx: Ctx) -> None:
    sel = spec["selector"]
    if not sel.get("matchLabels") and not sel.get("matchExpressions"):
        ctx.error((*path, "selector"), "must not be empty: a Deployment selects its pods by label")
        return
    labels = (spec["template"].get("metadata") or {}).get("labels") or {}
    if not selector_matches(sel, labels):
        ctx.error((*path, "template", "metadata", "labels"),
                  "do not match spec.selector: the Deployment would not select its own pods")


def _deployment_restart(spec: dict, path: Path, ctx: Ctx) -> None:
    policy = spec["template"]["spec"].get("restartPolicy")
    if policy != "Always":
        ctx.error((*path, "template", "spec", "restartPolicy"),
                  f'must be "Always" in a Deployment (got "{policy}")')


DEPLOYMENT_SPEC = Obj(
    {
        "replicas": opt(Int(0), 1),
        "selector": req(LABEL_SELECTOR),
        "template": req(Obj({"metadata": TEMPLATE_METADATA, "spec": req(POD_SPEC)})),
        # Accepted, no effect: rollout tuning.
        "strategy": Obj(
            {
                "type": Str(enum=("RollingUpdate", "Recreate")),
                "rollingUpdate": Obj({"maxUnavailable": PERCENT_OR_INT,
                                      "maxSurge": PERCENT_OR_INT}),
            },
            hooks=[_strategy],
        ),
        "minReadySeconds": Int(0),
        "revisionHistoryLimit": Int(0),
        "progressDeadlineSeconds": Int(1),
        "paused": Unsupported("rollouts cannot be paused"),
    },
    hooks=[
        Hook(_deployment_selector, needs=("selector", "template.metadata")),
        Hook(_deployment_restart, needs=("template.spec.restartPolicy",)),
    ],
)


def pod_ready(pod: Mapping[str, Any]) -> bool:
    """The pod's Ready condition is True."""
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("status") == "True"
    return False


def is_deleting(obj: Mapping[str, Any]) -> bool:
    """The object has a deletionTimestamp (it is terminating)."""
    return bool(obj["metadata"].get("deletionTimestamp"))
