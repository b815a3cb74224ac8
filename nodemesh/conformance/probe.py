"""The in-pod side of the conformance runner: ``python -m nodemesh.conformance.probe``.

The runner execs this inside one client pod (``nodemesh exec -n NS POD -- python -m
nodemesh.conformance.probe``) with a JSON job on stdin::

    {"test": "MeshConsumerRoute", "client": "consumer", "vars": {"v2_ip": "10.244.2.2"},
     "timeouts": {"max_time_to_consistency": 30, ...}}

It runs every check of that test that belongs to that client, all in parallel (each one
eventually consistent on its own, as upstream's ``t.Parallel()`` subtests are), and prints one
JSON object: ``{"test": ..., "client": ..., "results": [CheckResult.to_json(), ...]}``. The
requests go out from this process, so from the pod's network namespace and cgroup: exactly the
path an application in that pod takes. Exit code 0 even when checks fail (the results say so);
2 on a bad job.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from typing import Any, TextIO

from nodemesh.conformance.cases import Distribution, Expect, TimeoutConfig, by_name
from nodemesh.conformance.expect import CheckResult, await_convergence, check_distribution

__all__ = ["main", "run_job"]


def _timeouts(raw: dict[str, Any] | None) -> TimeoutConfig:
    known = {f.name for f in fields(TimeoutConfig)}
    return TimeoutConfig(**{k: v for k, v in (raw or {}).items() if k in known})


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    test = by_name(job["test"])
    client = job["client"]
    variables = {str(k): str(v) for k, v in (job.get("vars") or {}).items()}
    cfg = _timeouts(job.get("timeouts"))
    checks = [(i, c) for i, c in enumerate(test.checks) if c.client == client]

    def run(item: tuple[int, Expect | Distribution]) -> CheckResult:
        i, check = item
        name = check.title(i) if isinstance(check, Expect) else check.name
        try:
            if isinstance(check, Distribution):
                return check_distribution(check, cfg, variables, name)
            return await_convergence(check, cfg, variables, name)
        except Exception as e:  # a bug here must show as this check's failure, not a crash
            return CheckResult(name, client, False, f"probe error: {type(e).__name__}: {e}")

    # Upstream asserts one eventually-consistent 200 before a distribution check: run the plain
    # checks first (in parallel), then the distributions.
    plain = [c for c in checks if isinstance(c[1], Expect)]
    dists = [c for c in checks if isinstance(c[1], Distribution)]
    results: list[CheckResult] = []
    if plain:
        with ThreadPoolExecutor(max_workers=len(plain)) as pool:
            results += list(pool.map(run, plain))
    if dists and all(r.ok for r in results):
        results += [run(d) for d in dists]
    elif dists:
        results += [CheckResult(d.name, client, False, "not run: the request before it failed")
                    for _, d in dists]
    return {"test": test.short_name, "client": client,
            "results": [r.to_json() for r in results]}


def main(argv: list[str] | None = None, stdin: TextIO | None = None,
         stdout: TextIO | None = None) -> int:
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    try:
        job = json.load(stdin)
        out = run_job(job)
    except (ValueError, KeyError, TypeError) as e:
        print(f"nodemesh.conformance.probe: bad job: {e}", file=sys.stderr)
        return 2
    json.dump(out, stdout)
    stdout.write("\n")
    stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
