"""nodemesh: a sidecar-less service mesh (eBPF for L3/L4, one Envoy per node for L7)."""

__version__ = "0.1.0"
