"""`nodemesh-cni`: a chained CNI plugin that hands a pod's sandbox to its node's agent.

It runs after the plugin that makes the pod's interface (`ptp`, `bridge`, a cloud's VPC plugin),
as Cilium's chaining mode does. `spec` is the pure part (the CNI environment, the network
configuration and its prevResult in; results and error results out); `plugin` is the thin part
that talks to the agent's local API (`nodemesh.agent.cni` is the other side). docs/cni.md.
"""
