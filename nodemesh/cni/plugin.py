"""`nodemesh-cni` (and `python -m nodemesh.cni`): the thin part of the plugin.

Reads the CNI environment and stdin (`nodemesh.cni.spec` parses them), asks the node agent over
its local API's unix socket (POST /cni/add, /cni/del, /cni/check, /cni/gc; GET /healthz for
STATUS), and prints the result or the error result. Exit 0 on success, 1 on an error result.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any, BinaryIO, TextIO

from nodemesh.cluster.agentclient import AgentClient
from nodemesh.cni import spec
from nodemesh.cni.spec import CniError


def _ask(req: spec.Request, method: str, path: str, body: Any = None) -> Any:
    client = AgentClient(req.agent_socket, "", timeout=req.timeout)
    try:
        status, data = client.call(method, path, body)
    except TimeoutError:
        raise spec.agent_unreachable(req.command, req.agent_socket,
                                     f"no answer in {req.timeout:g} s") from None
    except OSError as e:
        raise spec.agent_unreachable(req.command, req.agent_socket,
                                     e.strerror or type(e).__name__) from None
    except Exception as e:  # a connection the agent dropped half-way (it died)
        raise spec.agent_unreachable(req.command, req.agent_socket,
                                     f"{type(e).__name__}: {e}") from None
    if status != 200:
        raise spec.agent_error(req.command, status, data)
    return data


def handle(req: spec.Request) -> dict[str, Any] | None:
    """Do what the request asks; the result to print (None: print nothing)."""
    if req.command == "VERSION":
        return spec.version_result(req.cni_version)
    if req.command == "STATUS":
        _ask(req, "GET", "/healthz")
        return None
    body = spec.agent_body(req)  # (ADD: the pod and its address, or a CNI error before asking)
    _ask(req, "POST", f"/cni/{req.command.lower()}", body)
    if req.command == "ADD":
        return spec.add_result(req)
    return None


def main(env: Mapping[str, str] | None = None, stdin: BinaryIO | None = None,
         stdout: TextIO | None = None) -> int:
    env = os.environ if env is None else env
    raw = (stdin or sys.stdin.buffer).read()
    out = stdout or sys.stdout
    try:
        req = spec.parse_request(env, raw)
        result = handle(req)
    except CniError as e:
        json.dump(e.result(spec.error_version(raw)), out)
        out.write("\n")
        out.flush()
        return 1
    if result is not None:
        json.dump(result, out)
        out.write("\n")
    out.flush()
    return 0


def console() -> None:
    sys.exit(main())
