"""A CNI network configuration list for a node of the local cluster (pure): Debian's reference
`ptp` plugin with `host-local` IPAM as the primary, `nodemesh-cni` chained after it
(`nodemesh cni-config` prints it; docs/cni.md).

The addresses come from the node's pod CIDR, from the part the local pod runtime never hands out
(`nodemesh.cluster.ipam.cni_range`), with the node's first address as the pods' gateway, so the
other nodes' routes to the node's CIDR reach these pods too.
"""

from __future__ import annotations

from typing import Any

from nodemesh.cni.spec import POD_NAME_ARG, POD_NAMESPACE_ARG, SPEC_VERSION


def chain_config(*, network: str, pod_cidr: str, address_range: tuple[str, str], gateway: str,
                 agent_socket: str, ipam_dir: str, pod: tuple[str, str] | None = None,
                 timeout_seconds: float | None = None) -> dict[str, Any]:
    """ptp + host-local, then nodemesh-cni. `pod` (namespace, name) goes into nodemesh-cni's
    `args.cni` for a runtime that passes no CNI_ARGS (ctr)."""
    nodemesh: dict[str, Any] = {"type": "nodemesh-cni", "agentSocket": agent_socket}
    if timeout_seconds is not None:
        nodemesh["timeoutSeconds"] = timeout_seconds
    if pod is not None:
        nodemesh["args"] = {"cni": {POD_NAMESPACE_ARG: pod[0], POD_NAME_ARG: pod[1]}}
    return {
        "cniVersion": SPEC_VERSION,
        "name": network,
        "plugins": [
            {"type": "ptp", "ipMasq": False, "ipam": {
                "type": "host-local", "dataDir": ipam_dir,
                "ranges": [[{"subnet": pod_cidr, "rangeStart": address_range[0],
                             "rangeEnd": address_range[1], "gateway": gateway}]],
                "routes": [{"dst": "0.0.0.0/0"}]}},
            nodemesh,
        ],
    }
