"""proxy: the agent's side of the node's Envoy.

`snapshot` (versioned resource sets), `xds` (the ADS server, SotW and delta, with per-node
status), `als` (the access-log receiver) and `envoy` (bootstrap, process, admin API).
See docs/proxy.md.
"""
