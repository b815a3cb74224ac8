"""The Gateway API mesh (GAMMA) conformance suite, run against a real local nodemesh cluster.

``python -m nodemesh.conformance`` brings up a fresh 2-node cluster in a private state dir,
applies the upstream conformance manifests (``data/manifests.yaml``), and for every upstream
scenario (``data/tests/*.yaml``) applies its routes, waits until they are accepted and every
node's agent has synced, sends the upstream test's requests from inside the right echo pod,
checks the answers the way upstream's ``MakeRequestAndExpectEventuallyConsistentResponse`` does,
and removes the routes again. It ends with an upstream-shaped ``ConformanceReport`` (YAML).

Modules:

- :mod:`.cases` — every conformance test as data: features, manifests, requests and expected
  responses (the upstream Go tests' ``http.ExpectedResponse`` values, rewritten in Python);
- :mod:`.expect` — the small interpreter of those expectations: build the echo client's request,
  parse its Istio-echo style output (as upstream's ``parse.go`` does), compare, wait for
  convergence, check weighted distributions within upstream's tolerance;
- :mod:`.probe` — what runs inside a client pod: one process per (test, client pod) that checks
  all of that client's expectations in parallel and prints JSON;
- :mod:`.runner` — the cluster side: up, apply, wait, exec the probes, clean up, down;
- :mod:`.report` — the ``ConformanceReport`` (profiles ``MESH-HTTP`` and ``MESH-GRPC``).

Importing this package imports nothing heavy; :data:`DATA_DIR` is the upstream data.
"""

from __future__ import annotations

import os

__all__ = ["DATA_COMMIT", "DATA_DIR", "MANIFESTS", "TESTS_DIR"]

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
MANIFESTS = os.path.join(DATA_DIR, "manifests.yaml")
TESTS_DIR = os.path.join(DATA_DIR, "tests")
# The upstream kubernetes-sigs/gateway-api commit the data was copied from (data/README.md).
DATA_COMMIT = "4564255ac2c35d582249b3cdf261bdf51c8bca32"
