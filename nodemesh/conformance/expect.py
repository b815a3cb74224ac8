"""The interpreter of the conformance expectations in :mod:`nodemesh.conformance.cases`.

It does what upstream's mesh helpers do (conformance/utils/echo/pod.go, parse.go, http/http.go,
weight/weight.go), in this project's own Python:

- :func:`client_args` turns a :class:`~.cases.Request` into the echo ``client`` command line that
  upstream execs in the pod (``client http://echo/path --method=GET -H Name:value``);
- :func:`send` runs that request with :mod:`nodemesh.echo.client` (in-process: the probe already
  runs inside the client pod) and :func:`parse_response` reads its Istio-echo output;
- :func:`compare` checks one response; :func:`await_convergence` repeats a request until it
  passes ``required_consecutive_successes`` times in a row (a failed attempt waits
  ``retry_delay``; the whole thing gives up after ``max_time_to_consistency``);
- :func:`check_distribution` sends a weighted batch and checks every backend's share.

:func:`compare` applies upstream's mesh checks (status, request headers present and absent,
response headers present and absent, the answering pod's name prefix) and, stricter than
upstream's mesh compare, the checks upstream's gateway compare makes: the path the backend saw,
the namespace that answered, and a redirect's ``Location`` (scheme, host, port, path).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from nodemesh.conformance.cases import Distribution, Expect, Request, TimeoutConfig

__all__ = [
    "CheckResult", "Response", "await_convergence", "backend_of_pod", "calculate_host",
    "check_distribution", "client_args", "compare", "parse_response", "send",
]

REDIRECT_CODES = (301, 302, 303, 307, 308)


@dataclass
class Response:
    """One parsed answer (upstream ``echo.Response``; header names lower-cased)."""

    code: str = ""
    hostname: str = ""
    url: str = ""  # the request target the backend saw
    host: str = ""
    namespace: str = ""
    method: str = ""
    request_headers: dict[str, list[str]] = field(default_factory=dict)
    response_headers: dict[str, str] = field(default_factory=dict)  # Go's Header.Set: last wins
    raw: str = ""

    def summary(self) -> dict[str, Any]:
        return {"code": self.code, "hostname": self.hostname, "url": self.url,
                "namespace": self.namespace,
                "location": self.response_headers.get("location", ""),
                "requestHeaders": {k: ",".join(v) for k, v in sorted(self.request_headers.items())},
                "responseHeaders": dict(sorted(self.response_headers.items()))}


@dataclass
class CheckResult:
    """The outcome of one check, as the probe reports it."""

    name: str
    client: str
    ok: bool
    error: str = ""
    attempts: int = 0
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "client": self.client, "ok": self.ok, "error": self.error,
                "attempts": self.attempts, "seconds": round(self.seconds, 3),
                "details": self.details}


# ---- the request -------------------------------------------------------------------------------


def calculate_host(host: str, scheme: str) -> str:
    """Upstream's CalculateHost: drop the port when it is the scheme's default."""
    name, sep, port = host.rpartition(":")
    if not sep or not port.isdigit():
        return host
    if (scheme, port) in (("http", "80"), ("https", "443")):
        return name
    return host


def client_args(req: Request, variables: dict[str, str] | None = None) -> list[str]:
    """The echo ``client`` arguments upstream's mesh makeRequest builds for ``req``."""
    protocol = (req.protocol or "http").lower()
    host = (req.host or "echo").format(**(variables or {}))
    args = [f"{protocol}://{calculate_host(host, protocol)}{req.path}"]
    if protocol != "grpc":
        args.append(f"--method={req.method or 'GET'}")
    for name, value in req.headers.items():
        args += ["-H", f"{name}:{value}"]
    return args


def send(req: Request, timeout: float, variables: dict[str, str] | None = None,
         extra_headers: dict[str, str] | None = None, rid: int = 0) -> Response:
    """Send ``req`` once with the echo client (new connection); raises on transport errors."""
    from nodemesh.echo import client

    args = client.parse_client_args([*client_args(req, variables), f"--timeout={timeout:g}s"])
    for name, value in (extra_headers or {}).items():
        args.headers.append((name, value))
    return parse_response(client.request_once(args, rid))


def parse_response(text: str) -> Response:
    """Read the echo client's output, as upstream's ParseResponse does (first match wins for the
    single-valued fields; ``RequestHeader`` values accumulate; ``ResponseHeader`` keeps the last)."""
    out = Response(raw=text)
    single = {"StatusCode": "code", "Hostname": "hostname", "URL": "url", "Host": "host",
              "Namespace": "namespace", "Method": "method"}
    for line in text.splitlines():
        _, sep, rest = line.partition("] ")
        if not sep:
            continue
        key, eq, value = rest.partition("=")
        if not eq:
            continue
        if key in single and not getattr(out, single[key]):
            setattr(out, single[key], value)
        elif key in ("RequestHeader", "ResponseHeader"):
            name, colon, hval = value.partition(":")
            if not colon:
                continue
            if key == "RequestHeader":
                out.request_headers.setdefault(name.lower(), []).append(hval)
            else:
                out.response_headers[name.lower()] = hval
    return out


# ---- one response ------------------------------------------------------------------------------


def compare(exp: Expect, resp: Response, variables: dict[str, str] | None = None) -> str | None:
    """None when ``resp`` is what ``exp`` expects, else why not."""
    try:
        code = int(resp.code)
    except ValueError:
        return f"invalid status code {resp.code!r}"
    if code not in exp.status:
        return f"wanted status code to be one of {list(exp.status)}, got {code}"
    want = exp.expected_request
    if want is not None:
        for name, value in want.headers.items():
            got = resp.request_headers.get(name.lower())
            if got is None:
                return (f"expected {name} header to be set, actual headers: "
                        f"{ {k: ','.join(v) for k, v in sorted(resp.request_headers.items())} }")
            if ",".join(got) != value:
                return f"expected {name} header to be set to {value}, got {','.join(got)}"
        for name in want.absent_headers:
            if name.lower() in resp.request_headers:
                return (f"expected {name} header to not be set, got "
                        f"{resp.request_headers[name.lower()]}")
        if want.path is not None and 200 <= code < 300 and resp.url != want.path:
            return f"expected path to be {want.path}, got {resp.url}"
    for name in exp.absent_response_headers:
        if name.lower() in resp.response_headers:
            return f"expected no header {name!r}, got {resp.response_headers[name.lower()]!r}"
    for name, value in exp.response_headers.items():
        got = resp.response_headers.get(name.lower(), "")
        if got != value:
            return f"expected header {name}={value}, got {got}"
    if not resp.hostname.startswith(exp.backend):
        return f"expected pod name to start with {exp.backend}, got {resp.hostname}"
    if exp.namespace and 200 <= code < 300 and resp.namespace != exp.namespace:
        return f"expected namespace to be {exp.namespace}, got {resp.namespace}"
    if exp.redirect is not None and code in REDIRECT_CODES:
        return _compare_redirect(exp, resp, variables)
    return None


def _compare_redirect(exp: Expect, resp: Response, variables: dict[str, str] | None) -> str | None:
    """Upstream gateway compare's redirect checks, with its defaults."""
    assert exp.redirect is not None
    location = resp.response_headers.get("location", "")
    if not location:
        return "redirect without a Location header"
    loc = urlsplit(location)
    got_host, got_port = loc.hostname or "", str(loc.port) if loc.port else ""
    want = exp.redirect
    req_path = exp.request.path.partition("?")[0] or "/"
    req_scheme = (exp.request.protocol or "http").lower()
    if want.host and want.host != got_host:
        return f"expected redirected hostname to be {want.host!r}, got {got_host!r} ({location})"
    if want.port:
        if want.port != got_port:
            return f"expected redirected port to be {want.port!r}, got {got_port!r} ({location})"
    elif loc.scheme.lower() == "http" and got_port not in ("", "80"):
        return f"for http scheme, expected redirected port to be 80 or not set, got {got_port!r}"
    elif loc.scheme.lower() == "https" and got_port not in ("", "443"):
        return f"for https scheme, expected redirected port to be 443 or not set, got {got_port!r}"
    if (want.scheme or req_scheme) != loc.scheme:
        return (f"expected redirected scheme to be {want.scheme or req_scheme!r}, got "
                f"{loc.scheme!r} ({location})")
    if (want.path or req_path) != loc.path:
        return f"expected redirected path to be {want.path or req_path!r}, got {loc.path!r}"
    return None


# ---- eventually consistent -----------------------------------------------------------------------


def await_convergence(exp: Expect, cfg: TimeoutConfig, variables: dict[str, str] | None = None,
                      name: str = "", sender: Callable[..., Response] = send,
                      clock: Callable[[], float] = time.monotonic,
                      sleep: Callable[[float], None] = time.sleep) -> CheckResult:
    """Upstream's AwaitConvergence around one request: ``required_consecutive_successes`` passes
    in a row; a failure resets the count and waits ``retry_delay``; time out after
    ``max_time_to_consistency``."""
    start = clock()
    successes = attempts = 0
    last_error = ""
    last: Response | None = None
    while True:
        if clock() - start > cfg.max_time_to_consistency:
            return CheckResult(name, exp.client, False,
                               f"timeout after {attempts} attempts ({successes}/"
                               f"{cfg.required_consecutive_successes} successes); last: "
                               f"{last_error}", attempts, clock() - start,
                               {"last": last.summary() if last else None})
        attempts += 1
        try:
            last = sender(exp.request, cfg.request_timeout, variables, rid=attempts - 1)
            error = compare(exp, last, variables)
        except Exception as e:  # the request failed: not ready yet
            last, error = None, f"request failed: {type(e).__name__}: {e}"
        if error is None:
            successes += 1
            if successes >= cfg.required_consecutive_successes:
                return CheckResult(name, exp.client, True, "", attempts, clock() - start,
                                   {"last": last.summary() if last else None})
            continue
        successes, last_error = 0, error
        sleep(cfg.retry_delay)


def backend_of_pod(pod: str) -> str:
    """Upstream's extractBackendName: ``echo-v1-7c9d8f6b4-x2v6c`` → ``echo-v1``."""
    parts = pod.split("-")
    return "-".join(parts[:-2]) if len(parts) >= 3 else pod


def _distribution_once(dist: Distribution, cfg: TimeoutConfig,
                       variables: dict[str, str] | None,
                       sender: Callable[..., Response]) -> tuple[str | None, dict[str, int]]:
    rng = random.SystemRandom()
    seen: dict[str, int] = {}
    lock = threading.Lock()
    errors: list[str] = []

    def one(i: int) -> None:
        extra: dict[str, str] = {}
        if dist.entropy:  # upstream's AddRandomEntropy: a delay, a random header, or both
            choice = rng.randrange(3)
            if choice in (0, 2):
                time.sleep(rng.randrange(1000) / 1000)
            if choice in (1, 2):
                extra["X-Jitter"] = str(rng.randrange(10000))
        try:
            resp = sender(dist.request, cfg.request_timeout, variables, extra_headers=extra, rid=i)
        except Exception as e:
            with lock:
                errors.append(f"request {i} failed: {type(e).__name__}: {e}")
            return
        backend = backend_of_pod(resp.hostname)
        with lock:
            if backend in dist.weights:
                seen[backend] = seen.get(backend, 0) + 1
            else:
                errors.append(f"request was handled by an unexpected pod {resp.hostname!r} "
                              f"(extracted backend: {backend!r}, status {resp.code})")

    with ThreadPoolExecutor(max_workers=dist.concurrency) as pool:
        list(pool.map(one, range(dist.total)))
    if errors:
        return f"error while sending requests: {errors[0]} ({len(errors)} errors)", seen
    problems = []
    active = sum(1 for w in dist.weights.values() if w > 0)
    if len(seen) != active:
        problems.append(f"expected {active} backends to receive traffic, but got {len(seen)}")
    for backend, want in sorted(dist.weights.items()):
        if backend not in seen and want != 0.0:
            problems.append(f"expect traffic to hit backend {backend!r} - but none was received")
            continue
        got = seen.get(backend, 0) / dist.total
        if abs(got - want) > dist.tolerance:
            problems.append(f"backend {backend!r} weighted traffic of {got} not within tolerance "
                            f"{want} (+/-{dist.tolerance:f})")
    return ("; ".join(sorted(problems)) or None), seen


def check_distribution(dist: Distribution, cfg: TimeoutConfig,
                       variables: dict[str, str] | None = None, name: str = "",
                       sender: Callable[..., Response] = send) -> CheckResult:
    """Upstream's weighted-distribution test, retried up to ``dist.attempts`` times."""
    start = time.monotonic()
    tries: list[dict[str, Any]] = []
    for attempt in range(1, dist.attempts + 1):
        error, seen = _distribution_once(dist, cfg, variables, sender)
        tries.append({"seen": dict(sorted(seen.items())), "error": error})
        if error is None:
            return CheckResult(name, dist.client, True, "", attempt, time.monotonic() - start,
                               {"total": dist.total, "weights": dist.weights, "tries": tries})
    return CheckResult(name, dist.client, False,
                       f"Weighted distribution tests failed {dist.attempts} times; last: "
                       f"{tries[-1]['error']}", dist.attempts, time.monotonic() - start,
                       {"total": dist.total, "weights": dist.weights, "tries": tries})
