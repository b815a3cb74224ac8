"""One node's desired state, computed purely from the store's objects: `build_node_snapshot`.

`services` (ClusterIP ports → backends), `snapshot` (identities, ipcache, LB, lowered policy,
endpoint entries, the node Envoy's resources and the redirects into it, the flow context).
The agent (`nodemesh.agent.reconcile`) gathers the inputs and applies the result; nothing here
touches the kernel, the store or a process.
"""
