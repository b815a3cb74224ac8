"""The local cluster: nodes and pods as network namespaces, workloads as processes.

`topology` builds the nodes and their underlay, `pods` is a node's pod runtime (makes the pods
the store assigns to the node exist, and reports them), `shim` is the small per-pod process that
runs and restarts containers, `daemon` is the cluster's supervisor (starts the node agents, runs the
Deployment controller and the scheduler). The host plumbing they use (namespaces, cgroups,
processes, a pod's sandbox) is in `nodemesh.host`.
"""
