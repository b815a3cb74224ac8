"""Observability: flows (from kernel events and Envoy access logs) in Hubble's shape, the flow
ring each agent keeps, `nodemesh observe` filters and printers, metrics."""
