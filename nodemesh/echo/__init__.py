"""The echo workload: what the conformance images ``echo-basic``/``echo-advanced`` run as.

nodemesh runs manifests without container images: the cluster maps a known image to a local
command. The Gateway API conformance echo images map to ``python -m nodemesh.echo`` with the
container's args unchanged (:func:`command_for`), and the pod's env (``POD_NAME``, ``NAMESPACE``,
``POD_IP``, ``NODE_NAME``, optionally ``SERVICE_NAME``, ``INGRESS_NAME``).

Modules: :mod:`.config` (flags, pod context), :mod:`.httpserver` (HTTP/1.1 JSON echo),
:mod:`.l4` (TCP and UDP echo), :mod:`.grpcecho` (gRPC echo, message classes, client helper),
:mod:`.tlsutil` (certificates), :mod:`.server` (runs the listeners), :mod:`.client` (the Istio-style
``client`` command the mesh conformance tests exec in a pod). See ``README.md`` here for the
request knobs. Importing this package does not import grpc or asyncio code.
"""

from __future__ import annotations

import sys

__all__ = ["IMAGE_ALIASES", "command_for", "matches_image"]

IMAGE_ALIASES = (
    "registry.k8s.io/gateway-api/conformance/echo-advanced",
    "registry.k8s.io/gateway-api/conformance/echo-basic",
    "gcr.io/k8s-staging-gateway-api/echo-basic",
    "gcr.io/k8s-staging-gateway-api/echo-advanced",
)


def _strip_tag(image: str) -> str:
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def matches_image(image: str) -> bool:
    """Whether ``image`` (``:tag`` and ``@digest`` ignored) is one of :data:`IMAGE_ALIASES`."""
    return _strip_tag(image) in IMAGE_ALIASES


def command_for(args: list[str]) -> list[str]:
    """The argv that runs the echo server with the container's ``args`` unchanged.

    ``command_for(["--port=8080", "--tcp=9090"])`` ->
    ``[sys.executable, "-m", "nodemesh.echo", "--port=8080", "--tcp=9090"]``. The same works for
    the conformance suite's exec of ``client URL ...`` inside an echo pod.
    """
    return [sys.executable, "-m", "nodemesh.echo", *args]
