"""The conformance report, in the shape of upstream's ``ConformanceReport``
(conformance/apis/v1: ``gateway.networking.k8s.io/v1``, kind ``ConformanceReport``).

Profiles and how a test counts, as upstream's suite decides it (conformance/utils/suite): a test
belongs to a profile when every feature it needs is one of the profile's core or extended
features; it counts as *extended* when any of them is not a core feature. A profile's result is
``failure`` with any failed test, ``partial`` with any skipped one, else ``success``.

``MESH-HTTP``: core ``Mesh`` + ``HTTPRoute``; extended: upstream's ``MeshExtendedFeatures`` and
``HTTPRouteExtendedFeatures``. ``MESH-GRPC``: core ``Mesh`` + ``GRPCRoute``; extended:
``MeshExtendedFeatures``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from nodemesh.conformance.cases import SUPPORTED_FEATURES

__all__ = ["PROFILES", "Outcome", "Profile", "build_report", "profiles_of"]

MESH_EXTENDED = (
    "MeshClusterIPMatching", "MeshConsumerRoute", "MeshHTTPRouteRewritePath",
    "MeshHTTPRouteSchemeRedirect", "MeshHTTPRouteRedirectPort", "MeshHTTPRouteRedirectPath",
    "MeshHTTPRouteBackendRequestHeaderModification", "MeshHTTPRouteQueryParamMatching",
    "MeshHTTPRouteNamedRouteRule",
)
HTTPROUTE_EXTENDED = (
    "HTTPRouteDestinationPortMatching", "HTTPRouteBackendRequestHeaderModification",
    "HTTPRouteQueryParamMatching", "HTTPRouteMethodMatching",
    "HTTPRouteResponseHeaderModification", "HTTPRoutePortRedirect", "HTTPRouteSchemeRedirect",
    "HTTPRoutePathRedirect", "HTTPRouteHostRewrite", "HTTPRoutePathRewrite",
    "HTTPRouteRequestMirror", "HTTPRouteRequestMultipleMirrors",
    "HTTPRouteRequestPercentageMirror", "HTTPRouteRequestTimeout", "HTTPRouteBackendTimeout",
    "HTTPRouteParentRefPort", "HTTPRouteBackendProtocolH2C", "HTTPRouteBackendProtocolWebSocket",
    "HTTPRouteNamedRouteRule", "HTTPRouteCORS", "HTTPRoute303RedirectStatusCode",
    "HTTPRoute307RedirectStatusCode", "HTTPRoute308RedirectStatusCode",
)


@dataclass(frozen=True)
class Profile:
    name: str
    core: frozenset[str]
    extended: frozenset[str]


PROFILES: tuple[Profile, ...] = (
    Profile("MESH-HTTP", frozenset({"Mesh", "HTTPRoute"}),
            frozenset(MESH_EXTENDED) | frozenset(HTTPROUTE_EXTENDED)),
    Profile("MESH-GRPC", frozenset({"Mesh", "GRPCRoute"}), frozenset(MESH_EXTENDED)),
)


@dataclass(frozen=True)
class Outcome:
    """One test's result, as the report needs it."""

    name: str
    features: tuple[str, ...]
    status: str  # "passed", "failed" or "skipped"
    provisional: bool = False


def profiles_of(features: Iterable[str]) -> list[tuple[str, bool]]:
    """``[(profile name, extended?)]`` for a test needing ``features``."""
    fs = set(features)
    return [(p.name, not fs <= p.core) for p in PROFILES if fs <= p.core | p.extended]


def _status(passed: int, skipped: int, failed: int, failed_tests: list[str],
            skipped_tests: list[str]) -> dict[str, Any]:
    result = "failure" if failed else "partial" if skipped else "success"
    out: dict[str, Any] = {"result": result,
                           "statistics": {"Passed": passed, "Skipped": skipped, "Failed": failed}}
    if skipped_tests:
        out["skippedTests"] = skipped_tests
    if failed_tests:
        out["failedTests"] = failed_tests
    return out


def _summary(level: str, status: dict[str, Any]) -> str:
    s = status["statistics"]
    text = {"success": "succeeded",
            "partial": f"partially succeeded with {s['Skipped']} test skips",
            "failure": f"failed with {s['Failed']} test failures"}[status["result"]]
    return f"{level} tests {text}"


def build_report(outcomes: Iterable[Outcome], *, version: str, date: str, gateway_api_version: str,
                 url: str, contact: list[str], channel: str = "standard") -> dict[str, Any]:
    """The ConformanceReport as a plain dict (YAML-ready, upstream's field names and order)."""
    outcomes = list(outcomes)
    profiles = []
    for p in PROFILES:
        levels: dict[bool, dict[str, list[str]]] = {
            False: {"passed": [], "failed": [], "skipped": []},
            True: {"passed": [], "failed": [], "skipped": []},
        }
        for o in outcomes:
            for name, extended in profiles_of(o.features):
                if name == p.name:
                    levels[extended][o.status].append(o.name)
        core = _status(len(levels[False]["passed"]), len(levels[False]["skipped"]),
                       len(levels[False]["failed"]), levels[False]["failed"],
                       levels[False]["skipped"])
        ext = _status(len(levels[True]["passed"]), len(levels[True]["skipped"]),
                      len(levels[True]["failed"]), levels[True]["failed"], levels[True]["skipped"])
        ext["supportedFeatures"] = sorted(p.extended & SUPPORTED_FEATURES)
        if p.extended - SUPPORTED_FEATURES:
            ext["unsupportedFeatures"] = sorted(p.extended - SUPPORTED_FEATURES)
        profiles.append({
            "name": p.name,
            "summary": f"{_summary('Core', core)}. {_summary('Extended', ext)}.",
            "core": core,
            "extended": ext,
        })
    report: dict[str, Any] = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "ConformanceReport",
        "implementation": {"organization": "nodemesh", "project": "nodemesh", "url": url,
                           "version": version, "contact": list(contact)},
        "date": date,
        "gatewayAPIVersion": gateway_api_version,
        "gatewayAPIChannel": channel,
        "mode": "mesh",
        "profiles": profiles,
    }
    provisional = sorted(o.name for o in outcomes if o.provisional and o.status == "passed")
    if provisional:
        report["succeededProvisionalTests"] = provisional
    return report
