"""The local cluster: nodes and pods as network namespaces, workloads as processes.

`topology` builds the nodes and their underlay, `pods` plumbs one pod (netns, veth, address,
cgroup), `shim` is the small per-pod process that runs and restarts containers, `daemon` is the
cluster's supervisor (starts the node agents, runs the Deployment controller and the scheduler).
"""
