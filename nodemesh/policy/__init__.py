"""Policies → per-pod policy-map entries and L7 rules.

The pipeline, all pure functions over plain data:

1. `compile_endpoint` (or `Compiler` / `compile_all`): Kubernetes NetworkPolicies and
   CiliumNetworkPolicies + the cluster view (`PolicyInput`) → one pod's `EndpointPolicy`
   (enforcement per direction, identity rules, CIDR rules, HTTP rules for the proxy);
2. `lower`: `EndpointPolicy` → the exact ``nm_policy`` / ``nm_policy_cidr`` entries of
   docs/datapath.md (port ranges as LPM prefixes, CIDRs folded);
3. `evaluate`: what the datapath decides for one connection, from those entries.

docs/policy.md explains the semantics chosen where Kubernetes or Cilium leave room.
"""

from nodemesh.policy.compile import Compiler, compile_all, compile_endpoint
from nodemesh.policy.evaluate import (
    DROP_POLICY_DENIED,
    DROP_POLICY_DENY,
    DROPPED,
    FORWARDED,
    REDIRECTED,
    Decision,
    evaluate,
)
from nodemesh.policy.ids import assign_policy_ids, policy_ref
from nodemesh.policy.lower import (
    POLICY_CIDR_MAX_RULES,
    CidrKey,
    CidrValue,
    LoweredPolicy,
    PolicyKey,
    PolicyValue,
    PortRule,
    lower,
    lower_policy,
)
from nodemesh.policy.types import (
    CidrRule,
    Direction,
    EndpointPolicy,
    IdentityRule,
    L7Rule,
    PolicyCompileError,
    PolicyInput,
    PolicyPod,
    PolicyVerdict,
)

__all__ = [
    "DROPPED",
    "DROP_POLICY_DENIED",
    "DROP_POLICY_DENY",
    "FORWARDED",
    "POLICY_CIDR_MAX_RULES",
    "REDIRECTED",
    "CidrKey",
    "CidrRule",
    "CidrValue",
    "Compiler",
    "Decision",
    "Direction",
    "EndpointPolicy",
    "IdentityRule",
    "L7Rule",
    "LoweredPolicy",
    "PolicyCompileError",
    "PolicyInput",
    "PolicyKey",
    "PolicyPod",
    "PolicyValue",
    "PolicyVerdict",
    "PortRule",
    "assign_policy_ids",
    "compile_all",
    "compile_endpoint",
    "evaluate",
    "lower",
    "lower_policy",
    "policy_ref",
]
