"""`nodemesh observe` filters, with `hubble observe`'s flags and meaning.

Values of one flag are alternatives (OR); different flags must all hold (AND). `--pod` and
`--namespace`, `--label`, `--service`, `--identity` match either side of a flow; `--from-*` and
`--to-*` one side. The same filter runs in the agent (to send less) and can run in the CLI.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta

from nodemesh.errors import NodemeshError
from nodemesh.model.labels import parse_selector, selector_matches

TYPES = ("trace", "drop", "l7", "agent")
PROTOCOLS = ("tcp", "udp", "icmp", "http", "grpc")
VERDICTS = ("FORWARDED", "DROPPED", "REDIRECTED", "TRANSLATED", "ERROR", "AUDIT")


@dataclass
class FlowFilter:
    pod: list[str] = field(default_factory=list)
    from_pod: list[str] = field(default_factory=list)
    to_pod: list[str] = field(default_factory=list)
    namespace: list[str] = field(default_factory=list)
    label: list[str] = field(default_factory=list)
    from_label: list[str] = field(default_factory=list)
    to_label: list[str] = field(default_factory=list)
    service: list[str] = field(default_factory=list)
    to_service: list[str] = field(default_factory=list)
    verdict: list[str] = field(default_factory=list)
    type: list[str] = field(default_factory=list)
    protocol: list[str] = field(default_factory=list)
    http_status: list[str] = field(default_factory=list)
    http_method: list[str] = field(default_factory=list)
    http_path: list[str] = field(default_factory=list)
    identity: list[str] = field(default_factory=list)
    since: str | None = None
    until: str | None = None

    def to_query(self) -> dict[str, list[str]]:
        q: dict[str, list[str]] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list) and v:
                q[f.name] = v
            elif isinstance(v, str):
                q[f.name] = [v]
        return q

    @classmethod
    def from_query(cls, q: Mapping[str, Sequence[str]]) -> FlowFilter:
        kw: dict = {}
        for f in fields(cls):
            if f.name in q:
                kw[f.name] = q[f.name][-1] if f.name in ("since", "until") else list(q[f.name])
        flt = cls(**kw)
        flt.validate()
        return flt

    def validate(self) -> None:
        for t in self.type:
            if t not in TYPES:
                raise NodemeshError(f"--type {t!r}: must be one of {', '.join(TYPES)}", 2)
        for p in self.protocol:
            if p.lower() not in PROTOCOLS:
                raise NodemeshError(f"--protocol {p!r}: must be one of {', '.join(PROTOCOLS)}", 2)
        for v in self.verdict:
            if v.upper() not in VERDICTS:
                raise NodemeshError(f"--verdict {v!r}: must be one of {', '.join(VERDICTS)}", 2)
        for s in self.http_status:
            if not re.fullmatch(r"[1-5](\d\d|\+)", s):
                raise NodemeshError(f"--http-status {s!r}: a code (404) or a class (5+)", 2)
        for i in self.identity:
            if not i.isdigit():
                raise NodemeshError(f"--identity {i!r}: must be a number", 2)
        for p in self.http_path:
            try:
                re.compile(p)
            except re.error as e:
                raise NodemeshError(f"--http-path {p!r}: not a regular expression: {e}", 2) from None
        for sel in (*self.label, *self.from_label, *self.to_label):
            parse_selector(sel)


def parse_time(text: str, now: datetime | None = None) -> str:
    """RFC 3339, or a duration ago (`30s`, `5m`, `2h`, `1d`) → RFC 3339 in UTC."""
    now = now or datetime.now(UTC)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", text.strip())
    if m:
        n, unit = float(m.group(1)), m.group(2)
        delta = {"ms": timedelta(milliseconds=n), "s": timedelta(seconds=n),
                 "m": timedelta(minutes=n), "h": timedelta(hours=n), "d": timedelta(days=n)}[unit]
        return (now - delta).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise NodemeshError(f"{text!r}: not a time (RFC 3339, or a duration such as 5m)", 2) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _pod_matches(spec: str, ep: Mapping) -> bool:
    ns, _, name = spec.rpartition("/")
    if ns and ep.get("namespace") != ns:
        return False
    if not ns and ep.get("namespace") is None:
        return False
    return str(ep.get("pod_name", "")).startswith(name) and bool(ep.get("pod_name"))


def _labels(ep: Mapping) -> dict[str, str]:
    out = {}
    for lbl in ep.get("labels") or []:
        k, _, v = lbl.partition("=")
        for prefix in ("k8s:", "reserved:"):
            if k.startswith(prefix):
                out[k] = v
                k = k[len(prefix):]
        out[k] = v
    return out


def _label_matches(sel: str, ep: Mapping) -> bool:
    return selector_matches(parse_selector(sel), _labels(ep))


def _svc_matches(spec: str, svc: Mapping | None) -> bool:
    if not svc:
        return False
    ns, _, name = spec.rpartition("/")
    return svc.get("name") == name and (not ns or svc.get("namespace") == ns)


def _time_of(flow: Mapping) -> datetime:
    t = str(flow.get("time", ""))
    base, _, frac = t.rstrip("Z").partition(".")
    return datetime.fromisoformat(base + "." + (frac + "000000")[:6]).replace(tzinfo=UTC) \
        if frac else datetime.fromisoformat(base).replace(tzinfo=UTC)


def matches(f: FlowFilter, flow: Mapping) -> bool:
    src, dst = flow.get("source") or {}, flow.get("destination") or {}
    l7 = flow.get("l7") or {}
    http = l7.get("http") or {}

    def any_of(values: list[str], pred) -> bool:
        return not values or any(pred(v) for v in values)

    checks = [
        any_of(f.pod, lambda p: _pod_matches(p, src) or _pod_matches(p, dst)),
        any_of(f.from_pod, lambda p: _pod_matches(p, src)),
        any_of(f.to_pod, lambda p: _pod_matches(p, dst)),
        any_of(f.namespace, lambda n: n in (src.get("namespace"), dst.get("namespace"))),
        any_of(f.label, lambda s: _label_matches(s, src) or _label_matches(s, dst)),
        any_of(f.from_label, lambda s: _label_matches(s, src)),
        any_of(f.to_label, lambda s: _label_matches(s, dst)),
        any_of(f.service, lambda s: _svc_matches(s, flow.get("destination_service"))
               or _svc_matches(s, flow.get("source_service"))),
        any_of(f.to_service, lambda s: _svc_matches(s, flow.get("destination_service"))),
        any_of(f.verdict, lambda v: flow.get("verdict") == v.upper()),
        any_of(f.type, lambda t: _type_matches(t, flow)),
        any_of(f.protocol, lambda p: _protocol_matches(p.lower(), flow)),
        any_of(f.http_status, lambda s: _status_matches(s, http.get("code"))),
        any_of(f.http_method, lambda m: str(http.get("method", "")).upper() == m.upper()),
        any_of(f.http_path, lambda p: http.get("url") is not None
               and re.search(p, _url_path(http.get("url", ""))) is not None),
        any_of(f.identity, lambda i: int(i) in (src.get("identity"), dst.get("identity"))),
    ]
    if not all(checks):
        return False
    if f.since or f.until:
        t = _time_of(flow)
        if f.since and t < _time_of({"time": f.since}):
            return False
        if f.until and t > _time_of({"time": f.until}):
            return False
    return True


def _url_path(url: str) -> str:
    m = re.match(r"^[a-z]+://[^/]*(/.*)?$", url)
    return (m.group(1) or "/") if m else url


def _type_matches(t: str, flow: Mapping) -> bool:
    if t == "agent":
        return flow.get("Type") == "AGENT"
    if t == "l7":
        return flow.get("Type") == "L7"
    if t == "drop":
        return flow.get("verdict") == "DROPPED" and flow.get("Type") != "L7"
    return flow.get("Type") == "L3_L4" and flow.get("verdict") != "DROPPED"


def _protocol_matches(p: str, flow: Mapping) -> bool:
    l4 = flow.get("l4") or {}
    l7 = flow.get("l7") or {}
    if p == "tcp":
        return "TCP" in l4
    if p == "udp":
        return "UDP" in l4
    if p == "icmp":
        return "ICMPv4" in l4
    if p == "grpc":
        return "grpc" in l7
    return "http" in l7 and "grpc" not in l7


def _status_matches(spec: str, code: object) -> bool:
    if not isinstance(code, int) or not code:
        return False
    if spec.endswith("+"):
        return str(code).startswith(spec[0])
    return str(code) == spec
