"""The per-node agent: watches the store, runs the node's pods, and drives the datapath and proxy."""
