"""The CNI side of `nodemesh-cni`, pure: environment and stdin in, a request or a CNI error out;
results and error results formed as the CNI specification (1.0.0, and GC/STATUS of 1.1.0) says.

Nothing here touches the network, the agent or a file: `nodemesh.cni.plugin` does.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

PLUGIN = "nodemesh-cni"
SPEC_VERSION = "1.0.0"
# 0.4.0 is the first with CHECK; 1.1.0 adds GC and STATUS. Results pass through unchanged (the
# prevResult is in the configuration's version already), so every one of these works alike.
SUPPORTED_VERSIONS = ("0.4.0", "1.0.0", "1.1.0")
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS")
DEFAULT_TIMEOUT_SECONDS = 30.0
# The plugin's own configuration fields, and those that runtimes put in every plugin's.
CONFIG_FIELDS = {"cniVersion", "name", "type", "agentSocket", "timeoutSeconds", "args",
                 "runtimeConfig", "prevResult", "capabilities", "cni.dev/valid-attachments",
                 "cni.dev/attachments"}
POD_NAMESPACE_ARG = "K8S_POD_NAMESPACE"
POD_NAME_ARG = "K8S_POD_NAME"
POD_UID_ARG = "K8S_POD_UID"
_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class Code(IntEnum):
    """CNI error codes: 1-99 are the specification's, 100 and up the plugin's own."""

    INCOMPATIBLE_VERSION = 1
    UNSUPPORTED_FIELD = 2
    UNKNOWN_CONTAINER = 3
    INVALID_ENV = 4
    IO_FAILURE = 5
    DECODE_FAILURE = 6
    INVALID_CONFIG = 7
    TRY_AGAIN_LATER = 11
    NOT_AVAILABLE = 50  # STATUS (1.1.0): the plugin cannot serve ADDs now
    # nodemesh-cni's own
    POD_REFUSED = 100  # the agent will not take this pod (not in the store, another node ...)
    DATAPATH_NOT_IN_PLACE = 101  # CHECK: a program, the endpoint entry or the veth is missing
    AGENT_FAILED = 102  # the agent could not program the pod (its log has the traceback)


class CniError(Exception):
    """An error result: printed on stdout as JSON, and the plugin exits 1."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = int(code)
        self.msg = msg
        self.details = details

    def result(self, cni_version: str = SPEC_VERSION) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


@dataclass(frozen=True)
class PodRef:
    namespace: str
    name: str
    uid: str = ""

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Attachment:
    """What the interface-making plugin before us left, as its prevResult says."""

    ifname: str
    ip: str  # the pod's IPv4 address, without a prefix
    prefix: str  # as the prevResult gave it ("10.244.1.200/24")
    host_interfaces: tuple[str, ...]  # prevResult interfaces outside any sandbox (veth, bridge)
    mac: str = ""


@dataclass(frozen=True)
class Request:
    command: str
    cni_version: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    network: str = ""
    config: Mapping[str, Any] = field(default_factory=dict)
    args: Mapping[str, str] = field(default_factory=dict)  # CNI_ARGS, then config args.cni
    prev_result: Mapping[str, Any] | None = None
    agent_socket: str = ""
    timeout: float = DEFAULT_TIMEOUT_SECONDS

    @property
    def key(self) -> str:
        """What names one attachment in CNI: the container ID and the interface."""
        return f"{self.container_id}/{self.ifname}"

    def pod(self) -> PodRef:
        """The pod this sandbox is for, from the runtime's args (K8S_POD_NAMESPACE/NAME)."""
        ns, name = self.args.get(POD_NAMESPACE_ARG, ""), self.args.get(POD_NAME_ARG, "")
        if not ns or not name:
            raise CniError(Code.INVALID_ENV, f"{PLUGIN}: no pod identity for container "
                           f"{self.container_id}: need {POD_NAMESPACE_ARG} and {POD_NAME_ARG}",
                           "CNI_ARGS carries them from containerd's CRI and CRI-O; a runtime "
                           "that passes none (ctr) can set them in the plugin's configuration "
                           'as "args": {"cni": {"K8S_POD_NAMESPACE": ..., "K8S_POD_NAME": ...}}')
        return PodRef(ns, name, self.args.get(POD_UID_ARG, ""))

    def attachment(self) -> Attachment:
        """The pod's interface and address from the prevResult (ADD and CHECK)."""
        if self.prev_result is None:
            raise CniError(Code.INVALID_CONFIG, f"{PLUGIN}: no prevResult: it runs chained, "
                           "after a plugin that creates the pod's interface (ptp, bridge, ...)",
                           "list it after that plugin in the network configuration list")
        return parse_attachment(self.prev_result, self.ifname, self.netns)


def parse_cni_args(text: str) -> dict[str, str]:
    """CNI_ARGS: `K=V;K2=V2` (empty is none)."""
    out: dict[str, str] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        k, sep, v = part.partition("=")
        if not sep or not k.strip():
            raise CniError(Code.INVALID_ENV, f"{PLUGIN}: CNI_ARGS: {part!r} is not KEY=VALUE")
        out[k.strip()] = v.strip()
    return out


def _env(env: Mapping[str, str], name: str, command: str) -> str:
    value = env.get(name, "")
    if not value:
        raise CniError(Code.INVALID_ENV, f"{PLUGIN}: {command}: {name} is not set")
    return value


def error_version(stdin: bytes) -> str:
    """cniVersion of the configuration, for the error result (the latest when unreadable)."""
    try:
        v = json.loads(stdin or b"{}").get("cniVersion")
    except (ValueError, AttributeError):
        return SPEC_VERSION
    return v if isinstance(v, str) and v in SUPPORTED_VERSIONS else SPEC_VERSION


def parse_request(env: Mapping[str, str], stdin: bytes) -> Request:
    """The request the runtime made: CNI_* environment variables and the configuration."""
    command = env.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(Code.INVALID_ENV, f"{PLUGIN}: CNI_COMMAND {command!r} is not one of "
                       + ", ".join(COMMANDS))
    try:
        conf = json.loads(stdin) if stdin and stdin.strip() else None
    except ValueError as e:
        raise CniError(Code.DECODE_FAILURE, f"{PLUGIN}: the network configuration on stdin "
                       f"is not JSON: {e}") from None
    if command == "VERSION":
        v = conf.get("cniVersion") if isinstance(conf, dict) else None
        return Request("VERSION", v if isinstance(v, str) and v else SPEC_VERSION)
    if not isinstance(conf, dict):
        raise CniError(Code.DECODE_FAILURE, f"{PLUGIN}: {command}: no network configuration "
                       "(a JSON object) on stdin")
    version = conf.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CniError(Code.INVALID_CONFIG, f"{PLUGIN}: cniVersion: required")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(Code.INCOMPATIBLE_VERSION, f"{PLUGIN}: cniVersion {version} is not "
                       "supported", "supported: " + ", ".join(SUPPORTED_VERSIONS))
    if command in ("GC", "STATUS") and version != "1.1.0":
        raise CniError(Code.INCOMPATIBLE_VERSION, f"{PLUGIN}: {command} needs cniVersion 1.1.0, "
                       f"the configuration says {version}")
    for name in ("name", "type"):
        if not isinstance(conf.get(name), str) or not conf.get(name):
            raise CniError(Code.INVALID_CONFIG, f"{PLUGIN}: {name}: required (a string)")
    unknown = sorted(set(conf) - CONFIG_FIELDS)
    if unknown:
        raise CniError(Code.UNSUPPORTED_FIELD, f"{PLUGIN}: unknown field {unknown[0]!r} in the "
                       "network configuration", "known: " + ", ".join(sorted(CONFIG_FIELDS)))
    sock = conf.get("agentSocket")
    if command != "VERSION" and (not isinstance(sock, str) or not sock.startswith("/")):
        raise CniError(Code.INVALID_CONFIG, f"{PLUGIN}: agentSocket: required, the absolute path "
                       "of the node agent's socket", "the local cluster's is "
                       "<state dir>/nodes/<node>/agent.sock (`nodemesh cni-config` prints a "
                       "network configuration with it)")
    timeout = conf.get("timeoutSeconds", DEFAULT_TIMEOUT_SECONDS)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 600:
        raise CniError(Code.INVALID_CONFIG, f"{PLUGIN}: timeoutSeconds: must be a number of "
                       "seconds in (0, 600]")
    args = parse_cni_args(env.get("CNI_ARGS", ""))
    conf_args = conf.get("args", {})
    if not isinstance(conf_args, dict) or not isinstance(conf_args.get("cni", {}), dict):
        raise CniError(Code.INVALID_CONFIG, f"{PLUGIN}: args: must be an object, its cni an object")
    for k, v in (conf_args.get("cni") or {}).items():
        if isinstance(v, str):
            args[k] = v
    prev = conf.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CniError(Code.INVALID_CONFIG, f"{PLUGIN}: prevResult: must be an object")
    base = {"cni_version": version, "network": conf["name"], "config": conf, "args": args,
            "prev_result": prev, "agent_socket": str(sock), "timeout": float(timeout)}
    if command in ("GC", "STATUS"):
        return Request(command, **base)
    container_id = _env(env, "CNI_CONTAINERID", command)
    if not _CONTAINER_ID.match(container_id):
        raise CniError(Code.INVALID_ENV, f"{PLUGIN}: CNI_CONTAINERID {container_id!r}: only "
                       "letters, digits, '_', '.' and '-', starting with a letter or digit")
    ifname = _env(env, "CNI_IFNAME", command)
    if len(ifname) > 15 or ifname in (".", "..") or re.search(r"[/:\s]", ifname):
        raise CniError(Code.INVALID_ENV, f"{PLUGIN}: CNI_IFNAME {ifname!r} is not a valid "
                       "interface name")
    netns = env.get("CNI_NETNS", "")
    if command in ("ADD", "CHECK"):
        netns = _env(env, "CNI_NETNS", command)
    if netns and not netns.startswith("/"):
        raise CniError(Code.INVALID_ENV, f"{PLUGIN}: CNI_NETNS {netns!r}: must be a path")
    return Request(command, container_id=container_id, netns=netns, ifname=ifname, **base)


def parse_attachment(prev: Mapping[str, Any], ifname: str, netns: str) -> Attachment:
    """The pod's interface in the prevResult (named ifname, in a sandbox) and its IPv4 address."""
    interfaces = prev.get("interfaces") or []
    ips = prev.get("ips") or []
    if not isinstance(interfaces, list) or not isinstance(ips, list):
        raise CniError(Code.INVALID_CONFIG, f"{PLUGIN}: prevResult: interfaces and ips must "
                       "be lists")
    index, mac = None, ""
    for i, itf in enumerate(interfaces):
        if isinstance(itf, dict) and itf.get("name") == ifname and itf.get("sandbox"):
            index, mac = i, str(itf.get("mac") or "")
            break
    hosts = tuple(str(itf["name"]) for itf in interfaces
                  if isinstance(itf, dict) and itf.get("name") and not itf.get("sandbox"))
    candidates = []
    for n, ipc in enumerate(ips):
        if not isinstance(ipc, dict) or not isinstance(ipc.get("address"), str):
            raise CniError(Code.INVALID_CONFIG, f"{PLUGIN}: prevResult: ips[{n}].address: "
                           "required (CIDR notation)")
        itf_index = ipc.get("interface")
        if itf_index is not None and itf_index != index:
            continue  # another interface's address
        try:
            addr = ipaddress.ip_interface(ipc["address"])
        except ValueError:
            raise CniError(Code.INVALID_CONFIG, f"{PLUGIN}: prevResult: ips[{n}].address "
                           f"{ipc['address']!r} is not an address in CIDR notation") from None
        if addr.version == 4:
            candidates.append((str(addr.ip), ipc["address"]))
    if index is None and interfaces:
        raise CniError(Code.INVALID_CONFIG, f"{PLUGIN}: prevResult has no interface {ifname} "
                       f"in a sandbox", "the plugin before nodemesh-cni must create CNI_IFNAME "
                       "in the pod's network namespace and list it in its result")
    if not candidates:
        raise CniError(Code.INVALID_CONFIG, f"{PLUGIN}: prevResult gives {ifname} no IPv4 "
                       "address (nodemesh's datapath is IPv4)")
    ip, prefix = candidates[0]
    return Attachment(ifname, ip, prefix, hosts, mac)


def version_result(requested: str) -> dict[str, Any]:
    return {"cniVersion": requested if requested in SUPPORTED_VERSIONS else SPEC_VERSION,
            "supportedVersions": list(SUPPORTED_VERSIONS)}


def add_result(req: Request) -> dict[str, Any]:
    """ADD's result: a chained plugin that adds no interface passes the prevResult on."""
    out = dict(req.prev_result or {})
    out["cniVersion"] = req.cni_version
    return out


def valid_attachments(req: Request) -> list[dict[str, str]]:
    """GC (1.1.0): the attachments the runtime still has, {containerID, ifname} each."""
    raw = req.config.get("cni.dev/valid-attachments")
    if raw is None:
        raw = req.config.get("cni.dev/attachments", [])
    if not isinstance(raw, list):
        raise CniError(Code.INVALID_CONFIG, f"{PLUGIN}: cni.dev/valid-attachments: must be a list")
    out = []
    for n, a in enumerate(raw):
        if not isinstance(a, dict) or not isinstance(a.get("containerID"), str) \
                or not isinstance(a.get("ifname"), str):
            raise CniError(Code.INVALID_CONFIG, f"{PLUGIN}: cni.dev/valid-attachments[{n}]: "
                           "needs containerID and ifname (strings)")
        out.append({"containerID": a["containerID"], "ifname": a["ifname"]})
    return out


def agent_body(req: Request) -> dict[str, Any]:
    """What the plugin asks the agent for this request (POST /cni/<command>)."""
    body: dict[str, Any] = {"network": req.network}
    if req.command in ("ADD", "DEL", "CHECK"):
        body.update({"containerID": req.container_id, "ifname": req.ifname, "netns": req.netns})
    if req.command == "ADD":
        pod = req.pod()
        att = req.attachment()
        body.update({"pod": {"namespace": pod.namespace, "name": pod.name, "uid": pod.uid},
                     "ip": att.ip, "address": att.prefix, "hostInterfaces": list(att.host_interfaces),
                     "mac": att.mac})
    elif req.command == "CHECK":
        body["ip"] = req.attachment().ip
    elif req.command == "GC":
        body["validAttachments"] = valid_attachments(req)
    return body


def agent_error(command: str, status: int, data: Any) -> CniError:
    """The agent's answer to a failed request, as a CNI error (the agent names the code)."""
    msg = data.get("error") if isinstance(data, dict) else None
    code = data.get("cniCode") if isinstance(data, dict) else None
    if not isinstance(code, int):
        code = Code.TRY_AGAIN_LATER if status in (502, 503, 504) else Code.AGENT_FAILED
    details = data.get("details", "") if isinstance(data, dict) else ""
    return CniError(code, f"{PLUGIN}: {command}: {msg or f'the agent answered HTTP {status}'}",
                    details if isinstance(details, str) else "")


def agent_unreachable(command: str, socket_path: str, reason: str) -> CniError:
    """The agent is down (or did not answer in time): try again later, nothing was plumbed."""
    code = Code.NOT_AVAILABLE if command == "STATUS" else Code.TRY_AGAIN_LATER
    return CniError(code, f"{PLUGIN}: {command}: the nodemesh agent is not reachable at "
                    f"{socket_path} ({reason})",
                    "nothing was programmed for this pod; the runtime retries (start the node's "
                    "agent, or check agentSocket in the network configuration)")
