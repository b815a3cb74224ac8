"""`nodemesh demo`: a small app on a 2-node cluster, with policies, a canary route, traffic and
a report. `app` is the demo's HTTP service (one process per pod), `manifests` its YAML, `run`
the driver behind `nodemesh demo` / `make demo`."""
