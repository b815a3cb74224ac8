"""Observability: flows (from kernel events and Envoy access logs) in Hubble's shape, the flow
ring each agent keeps, `nodemesh observe` filters, metrics. (The printers of
`nodemesh observe` are in `nodemesh.cli.printer`.)"""
