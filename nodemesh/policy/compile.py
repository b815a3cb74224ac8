"""The policy compiler's entry points: every policy that selects a pod → its `EndpointPolicy`.

Pure: the input is plain data (`PolicyInput`), the output plain data; no store, no I/O. Compile
every local pod with one `Compiler` (it precomputes the cluster view once).
"""

from __future__ import annotations

from nodemesh.policy.ciliumpolicy import compile_cilium_policy
from nodemesh.policy.context import Builder, Context
from nodemesh.policy.networkpolicy import compile_network_policy
from nodemesh.policy.types import EndpointPolicy, PolicyInput, PolicyPod


class Compiler:
    """Compiles endpoints against one `PolicyInput`."""

    def __init__(self, inp: PolicyInput) -> None:
        self.ctx = Context(inp)

    def compile(self, ep: PolicyPod) -> EndpointPolicy:
        b = Builder(self.ctx, ep)
        for policy in self.ctx.inp.network_policies:
            compile_network_policy(self.ctx, policy, b)
        for policy in self.ctx.inp.cilium_policies:
            compile_cilium_policy(self.ctx, policy, b)
        return b.finish()


def compile_endpoint(ep: PolicyPod, inp: PolicyInput) -> EndpointPolicy:
    """The compiled policy of one endpoint (see `nodemesh.policy` for the semantics)."""
    return Compiler(inp).compile(ep)


def compile_all(inp: PolicyInput) -> dict[str, EndpointPolicy]:
    """Every endpoint of the input → its policy, keyed ``namespace/name``."""
    compiler = Compiler(inp)
    return {ep.ref: compiler.compile(ep) for ep in inp.endpoints}
