"""Every case of tests/netpol_cases.py through compile + lower + evaluate: the full 81-pair matrix.

The pure twin of the real-kernel netpol test: the same cases, with the datapath replaced by
`nodemesh.policy.evaluate` over the lowered map entries. A connection gets through when the
client's egress and the server's ingress both let it (forwarded or redirected).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from nodemesh.policy import Compiler, Direction, evaluate, lower_policy
from tests.netpol_cases import (
    CASES,
    CILIUM_CASES,
    MODEL_IPS,
    NETPOL_CASES,
    Allocator,
    Case,
    State,
    policy_input,
    resolve_policy,
)


def run_case(case: Case, admit: Callable[[dict], dict] | None = None) -> list[str]:
    """Run a case; the failures, each with the expected/observed truth table. `admit` turns each
    policy into what the store would hold (validation and defaulting)."""
    state = State(server_ports=case.server_ports)
    alloc = Allocator()
    failures = []
    for n, step in enumerate(case.steps):
        if admit is not None:
            step = replace(step, apply=tuple(admit(resolve_policy(p, MODEL_IPS)) for p in step.apply))
        state.run(step, MODEL_IPS)
        inp = policy_input(state, MODEL_IPS, alloc)
        compiler = Compiler(inp)
        by_pod = {f"{ep.namespace}/{ep.name}": ep for ep in inp.endpoints}
        lowered = {
            pod: lower_policy(compiler.compile(ep), ifindex)
            for ifindex, (pod, ep) in enumerate(sorted(by_pod.items()), start=10)
        }
        for probe in step.probes:
            observed = {}
            for src, dst in probe.expected.pairs():
                s, d = by_pod[src], by_pod[dst]
                out = evaluate(lowered[src], Direction.EGRESS, d.identity, d.ip, probe.protocol, probe.port)
                into = evaluate(lowered[dst], Direction.INGRESS, s.identity, s.ip, probe.protocol, probe.port)
                observed[(src, dst)] = out.allowed and into.allowed
            wrong = [p for p, ok in observed.items() if ok != probe.expected.expected(*p)]
            if wrong:
                failures.append(
                    f"step {n} ({step.description}), {probe.protocol}/{probe.port}: "
                    f"{len(wrong)} wrong, e.g. {wrong[:4]}\n{probe.expected.table(observed)}"
                )
    return failures


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(case: Case) -> None:
    failures = run_case(case)
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case_as_admitted(case: Case) -> None:
    """The same, with every policy first validated and defaulted by the model (the exact shape
    the agent hands the compiler). A case whose policies nodemesh refuses fails: every case is
    meant to apply (the real-kernel test applies it through the CLI), so a refusal is a bug in
    the case or in validation, not a reason to test less."""
    from nodemesh.errors import InvalidManifest
    from nodemesh.model.validate import validate_objects

    def admit(obj: dict) -> dict:
        return validate_objects([obj], "netpol_cases")[0]

    try:
        failures = run_case(case, admit)
    except InvalidManifest as e:
        pytest.fail(f"case {case.name}: validation refuses its policies: {e.errors}")
    assert not failures, "\n\n".join(failures)


def test_a_case_validation_refuses_fails() -> None:
    refused = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"name": "refused", "namespace": "x"},
               "spec": {"podSelector": {"matchLabels": {"-not-a-key": "a"}}}}
    case = CASES[0]
    case = replace(case, steps=(replace(case.steps[0], apply=(refused,)),))
    with pytest.raises(pytest.fail.Exception, match="validation refuses"):
        test_case_as_admitted(case)


def test_case_counts() -> None:
    assert len(NETPOL_CASES) >= 25
    assert len(CILIUM_CASES) >= 8
    assert all(c.upstream for c in NETPOL_CASES)
    assert not any(c.upstream for c in CILIUM_CASES)
    assert len({c.name for c in CASES}) == len(CASES)


def test_every_case_probes_something() -> None:
    for case in CASES:
        assert any(step.probes for step in case.steps), case.name
        for step in case.steps:
            for probe in step.probes:
                assert probe.port in case.server_ports, (case.name, probe.port)
                assert len(probe.expected.pairs()) == 72
