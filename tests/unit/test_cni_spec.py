"""nodemesh-cni's pure part: the CNI environment and configuration in, requests, results and
error results out (nodemesh.cni.spec), the chain configuration (nodemesh.cni.conf), and the
plugin's handling of answers and an unreachable agent (nodemesh.cni.plugin, against a real unix
socket server in a thread)."""

from __future__ import annotations

import io
import json
import os
import socket
import tempfile
import threading

import pytest

from nodemesh.cni import plugin, spec
from nodemesh.cni.conf import chain_config
from nodemesh.cni.spec import CniError, Code

SOCK = "/run/nodemesh-test/agent.sock"
PREV = {"cniVersion": "1.0.0",
        "interfaces": [{"name": "veth1234", "mac": "aa:bb:cc:dd:ee:ff"},
                       {"name": "eth0", "mac": "11:22:33:44:55:66", "sandbox": "/proc/9/ns/net"}],
        "ips": [{"interface": 1, "address": "10.244.1.200/24", "gateway": "10.244.1.1"}],
        "routes": [{"dst": "0.0.0.0/0"}], "dns": {}}


def conf(**over: object) -> dict:
    c: dict = {"cniVersion": "1.0.0", "name": "nodemesh", "type": "nodemesh-cni",
               "agentSocket": SOCK, "prevResult": PREV}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def env(command: str = "ADD", **over: str) -> dict[str, str]:
    e = {"CNI_COMMAND": command, "CNI_CONTAINERID": "default-web", "CNI_NETNS": "/proc/9/ns/net",
         "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
         "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web"}
    e.update(over)
    return {k: v for k, v in e.items() if v is not None}


def parse(command: str = "ADD", c: dict | None = None, **e: str) -> spec.Request:
    return spec.parse_request(env(command, **e), json.dumps(conf() if c is None else c).encode())


def refused(command: str = "ADD", c: dict | None = None, raw: bytes | None = None,
            **e: str) -> CniError:
    with pytest.raises(CniError) as info:
        spec.parse_request(env(command, **e), raw if raw is not None else
                           json.dumps(conf() if c is None else c).encode())
    return info.value


# ---- the environment ------------------------------------------------------------------------
def test_add_request_has_everything() -> None:
    r = parse()
    assert (r.command, r.container_id, r.netns, r.ifname) == ("ADD", "default-web",
                                                              "/proc/9/ns/net", "eth0")
    assert r.key == "default-web/eth0" and r.network == "nodemesh" and r.agent_socket == SOCK
    assert r.pod() == spec.PodRef("default", "web") and str(r.pod()) == "default/web"
    assert r.timeout == spec.DEFAULT_TIMEOUT_SECONDS


def test_unknown_or_missing_command() -> None:
    assert refused(CNI_COMMAND="FOO").code == Code.INVALID_ENV
    e = refused(CNI_COMMAND=None)
    assert e.code == Code.INVALID_ENV and "CNI_COMMAND" in e.msg


@pytest.mark.parametrize("var", ["CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS"])
def test_add_needs_its_variables(var: str) -> None:
    e = refused(**{var: None})
    assert e.code == Code.INVALID_ENV and var in e.msg


def test_del_needs_no_netns() -> None:
    r = parse("DEL", CNI_NETNS=None)
    assert r.netns == "" and r.command == "DEL"
    assert refused("DEL", CNI_CONTAINERID=None).code == Code.INVALID_ENV


@pytest.mark.parametrize("cid", ["-x", "a b", "a/b", "ü"])
def test_container_id_characters(cid: str) -> None:
    assert refused(CNI_CONTAINERID=cid).code == Code.INVALID_ENV


@pytest.mark.parametrize("ifname", ["a" * 16, ".", "..", "e/0", "e:0", "e 0"])
def test_interface_names(ifname: str) -> None:
    e = refused(CNI_IFNAME=ifname)
    assert e.code == Code.INVALID_ENV and "CNI_IFNAME" in e.msg


def test_netns_must_be_a_path() -> None:
    assert refused(CNI_NETNS="mynetns").code == Code.INVALID_ENV


def test_cni_args() -> None:
    assert spec.parse_cni_args("") == {}
    assert spec.parse_cni_args("A=1; B = 2;;") == {"A": "1", "B": "2"}
    assert spec.parse_cni_args("A=") == {"A": ""}
    for bad in ("A", "=1", "A=1;B"):
        with pytest.raises(CniError) as info:
            spec.parse_cni_args(bad)
        assert info.value.code == Code.INVALID_ENV
    assert refused(CNI_ARGS="K8S_POD_NAME").code == Code.INVALID_ENV


def test_pod_identity_from_the_config_args_when_cni_args_has_none() -> None:
    c = conf(args={"cni": {"K8S_POD_NAMESPACE": "prod", "K8S_POD_NAME": "api",
                           "K8S_POD_UID": "u-1"}})
    r = parse(c=c, CNI_ARGS="")
    assert r.pod() == spec.PodRef("prod", "api", "u-1")
    # the configuration's args win over CNI_ARGS
    assert parse(c=c).pod().name == "api"


def test_no_pod_identity() -> None:
    r = parse(CNI_ARGS="IgnoreUnknown=1")
    with pytest.raises(CniError) as info:
        r.pod()
    assert info.value.code == Code.INVALID_ENV and "K8S_POD_NAME" in info.value.msg
    assert "ctr" in info.value.details


# ---- the configuration ------------------------------------------------------------------------
def test_stdin_not_json() -> None:
    e = refused(raw=b"{nope")
    assert e.code == Code.DECODE_FAILURE and "not JSON" in e.msg
    assert refused(raw=b"").code == Code.DECODE_FAILURE
    assert refused(raw=b"[1]").code == Code.DECODE_FAILURE


def test_versions() -> None:
    e = refused(c=conf(cniVersion="0.3.1"))
    assert e.code == Code.INCOMPATIBLE_VERSION and "1.0.0" in e.details
    assert refused(c=conf(cniVersion=None)).code == Code.INVALID_CONFIG
    for v in spec.SUPPORTED_VERSIONS:
        assert parse(c=conf(cniVersion=v)).cni_version == v


def test_gc_and_status_need_1_1_0() -> None:
    assert refused("GC", c=conf()).code == Code.INCOMPATIBLE_VERSION
    assert refused("STATUS", c=conf()).code == Code.INCOMPATIBLE_VERSION
    assert parse("STATUS", c=conf(cniVersion="1.1.0")).command == "STATUS"


@pytest.mark.parametrize("field", ["name", "type"])
def test_required_fields(field: str) -> None:
    e = refused(c=conf(**{field: None}))
    assert e.code == Code.INVALID_CONFIG and field in e.msg


def test_unknown_field_is_refused_by_name() -> None:
    e = refused(c=conf(mtu=1400))
    assert e.code == Code.UNSUPPORTED_FIELD and "'mtu'" in e.msg


def test_runtime_fields_are_accepted() -> None:
    parse(c=conf(runtimeConfig={"portMappings": []}, capabilities={"portMappings": True}))


@pytest.mark.parametrize("sock", [None, "relative.sock", 5])
def test_agent_socket(sock: object) -> None:
    c = conf()
    if sock is None:
        del c["agentSocket"]
    else:
        c["agentSocket"] = sock
    e = refused(c=c)
    assert e.code == Code.INVALID_CONFIG and "agentSocket" in e.msg


@pytest.mark.parametrize("t", [0, -1, 601, "5", True])
def test_timeout(t: object) -> None:
    assert refused(c=conf(timeoutSeconds=t)).code == Code.INVALID_CONFIG


def test_timeout_ok() -> None:
    assert parse(c=conf(timeoutSeconds=2.5)).timeout == 2.5


def test_args_must_be_objects() -> None:
    assert refused(c=conf(args=[1])).code == Code.INVALID_CONFIG
    assert refused(c=conf(args={"cni": "x"})).code == Code.INVALID_CONFIG


def test_prev_result_must_be_an_object() -> None:
    assert refused(c=conf(prevResult=[1])).code == Code.INVALID_CONFIG


# ---- the prevResult -----------------------------------------------------------------------------
def test_attachment_from_ptp() -> None:
    a = parse().attachment()
    assert (a.ifname, a.ip, a.prefix, a.host_interfaces, a.mac) == (
        "eth0", "10.244.1.200", "10.244.1.200/24", ("veth1234",), "11:22:33:44:55:66")


def test_attachment_from_bridge_lists_the_bridge_and_the_veth() -> None:
    prev = {"interfaces": [{"name": "cni0"}, {"name": "veth9"},
                           {"name": "eth0", "sandbox": "/proc/9/ns/net"}],
            "ips": [{"interface": 2, "address": "10.244.1.201/24"}]}
    a = spec.parse_attachment(prev, "eth0", "/proc/9/ns/net")
    assert a.ip == "10.244.1.201" and a.host_interfaces == ("cni0", "veth9")


def test_attachment_without_prev_result() -> None:
    r = parse(c=conf(prevResult=None))
    with pytest.raises(CniError) as info:
        r.attachment()
    assert info.value.code == Code.INVALID_CONFIG and "chained" in info.value.msg


def test_attachment_other_interface_name() -> None:
    with pytest.raises(CniError) as info:
        parse(CNI_IFNAME="net1").attachment()
    assert "no interface net1" in info.value.msg


def test_attachment_ipv6_only_or_other_interface_addresses() -> None:
    prev = {"interfaces": [{"name": "eth0", "sandbox": "/x"}, {"name": "eth1", "sandbox": "/x"}],
            "ips": [{"interface": 0, "address": "fd00::5/64"},
                    {"interface": 1, "address": "10.0.0.5/24"}]}
    with pytest.raises(CniError) as info:
        spec.parse_attachment(prev, "eth0", "/x")
    assert "no IPv4" in info.value.msg


def test_attachment_first_ipv4_wins_and_interface_index_is_optional() -> None:
    prev = {"interfaces": [], "ips": [{"address": "fd00::5/64"}, {"address": "10.0.0.5/24"},
                                      {"address": "10.0.0.6/24"}]}
    assert spec.parse_attachment(prev, "eth0", "/x").ip == "10.0.0.5"


@pytest.mark.parametrize("ips", [[{"address": "nonsense"}], [{"gateway": "1.2.3.4"}], [5]])
def test_attachment_bad_addresses(ips: list) -> None:
    with pytest.raises(CniError) as info:
        spec.parse_attachment({"ips": ips}, "eth0", "/x")
    assert info.value.code == Code.INVALID_CONFIG and "ips[0]" in info.value.msg


def test_attachment_lists_must_be_lists() -> None:
    with pytest.raises(CniError):
        spec.parse_attachment({"interfaces": {}, "ips": []}, "eth0", "/x")


# ---- results ----------------------------------------------------------------------------------
def test_add_result_passes_the_prev_result_on() -> None:
    out = spec.add_result(parse(c=conf(cniVersion="0.4.0")))
    assert out["ips"] == PREV["ips"] and out["interfaces"] == PREV["interfaces"]
    assert out["cniVersion"] == "0.4.0"


def test_error_result_shape() -> None:
    e = CniError(Code.TRY_AGAIN_LATER, "msg", "why")
    assert e.result("1.0.0") == {"cniVersion": "1.0.0", "code": 11, "msg": "msg", "details": "why"}
    assert "details" not in CniError(7, "m").result()


def test_error_version_follows_the_configuration() -> None:
    assert spec.error_version(json.dumps(conf(cniVersion="0.4.0")).encode()) == "0.4.0"
    assert spec.error_version(b"garbage") == spec.SPEC_VERSION
    assert spec.error_version(json.dumps(conf(cniVersion="9.9.9")).encode()) == spec.SPEC_VERSION


def test_version_result() -> None:
    assert spec.version_result("0.4.0") == {"cniVersion": "0.4.0",
                                            "supportedVersions": list(spec.SUPPORTED_VERSIONS)}
    assert spec.version_result("0.1.0")["cniVersion"] == spec.SPEC_VERSION


def test_version_needs_no_environment_or_config() -> None:
    r = spec.parse_request({"CNI_COMMAND": "VERSION"}, b"")
    assert r.command == "VERSION" and r.cni_version == spec.SPEC_VERSION


def test_agent_bodies() -> None:
    add = spec.agent_body(parse())
    assert add["pod"] == {"namespace": "default", "name": "web", "uid": ""}
    assert add["ip"] == "10.244.1.200" and add["hostInterfaces"] == ["veth1234"]
    assert add["containerID"] == "default-web" and add["netns"] == "/proc/9/ns/net"
    assert spec.agent_body(parse("CHECK"))["ip"] == "10.244.1.200"
    d = spec.agent_body(parse("DEL", CNI_NETNS=None))
    assert d == {"network": "nodemesh", "containerID": "default-web", "ifname": "eth0", "netns": ""}


def test_gc_valid_attachments() -> None:
    c = conf(cniVersion="1.1.0", **{"cni.dev/valid-attachments": [
        {"containerID": "a", "ifname": "eth0"}]})
    assert spec.agent_body(parse("GC", c=c))["validAttachments"] == [
        {"containerID": "a", "ifname": "eth0"}]
    bad = conf(cniVersion="1.1.0", **{"cni.dev/valid-attachments": [{"containerID": "a"}]})
    with pytest.raises(CniError):
        spec.agent_body(parse("GC", c=bad))


def test_agent_errors_keep_the_agents_code() -> None:
    e = spec.agent_error("ADD", 400, {"error": "pod default/web is not in the store",
                                      "cniCode": 100, "details": "create it"})
    assert (e.code, e.details) == (100, "create it") and "not in the store" in e.msg
    assert spec.agent_error("ADD", 503, {"error": "stopping"}).code == Code.TRY_AGAIN_LATER
    assert spec.agent_error("ADD", 500, None).code == Code.AGENT_FAILED
    assert spec.agent_unreachable("STATUS", SOCK, "x").code == Code.NOT_AVAILABLE
    assert spec.agent_unreachable("ADD", SOCK, "x").code == Code.TRY_AGAIN_LATER


# ---- the chain configuration ----------------------------------------------------------------------
def test_chain_config() -> None:
    c = chain_config(network="nodemesh", pod_cidr="10.244.1.0/24",
                     address_range=("10.244.1.192", "10.244.1.254"), gateway="10.244.1.1",
                     agent_socket=SOCK, ipam_dir="/state/ipam", pod=("default", "web"))
    ptp, mesh = c["plugins"]
    assert ptp["type"] == "ptp" and ptp["ipam"]["dataDir"] == "/state/ipam"
    assert ptp["ipam"]["ranges"][0][0]["rangeStart"] == "10.244.1.192"
    assert mesh == {"type": "nodemesh-cni", "agentSocket": SOCK, "args": {"cni": {
        "K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "web"}}}
    # what the chain hands nodemesh-cni parses as a request
    conf_in = {"cniVersion": c["cniVersion"], "name": c["name"], **mesh, "prevResult": PREV}
    r = spec.parse_request(env(CNI_ARGS=""), json.dumps(conf_in).encode())
    assert r.pod() == spec.PodRef("default", "web")


# ---- the plugin against a unix socket ------------------------------------------------------------
class CannedAnswers:
    """A real unix socket server in a thread that answers one HTTP request per connection with
    a canned status and JSON body (the agent's side of the protocol is tested for real in
    tests/integration/test_cni.py)."""

    def __init__(self, status: int, body: object, answer: bool = True) -> None:
        self.dir = tempfile.mkdtemp()
        self.path = os.path.join(self.dir, "a.sock")
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(self.path)
        self.sock.listen(4)
        self.requests: list[bytes] = []
        self.status, self.body, self.answer = status, body, answer
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, rest = data.partition(b"\r\n\r\n")
            n = next((int(h.split(b":")[1]) for h in head.split(b"\r\n")
                      if h.lower().startswith(b"content-length")), 0)
            while len(rest) < n:
                rest += conn.recv(65536)
            self.requests.append(head.split(b"\r\n")[0] + b" " + rest)
            if not self.answer:
                continue  # keep the connection open, never answer
            body = json.dumps(self.body).encode()
            conn.sendall(f"HTTP/1.1 {self.status} X\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + body)
            conn.close()

    def close(self) -> None:
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


def run_plugin(e: dict[str, str], c: dict) -> tuple[int, object]:
    out = io.StringIO()
    code = plugin.main(e, io.BytesIO(json.dumps(c).encode()), out)
    text = out.getvalue().strip()
    return code, json.loads(text) if text else None


def test_plugin_add_and_del_through_the_socket() -> None:
    srv = CannedAnswers(200, {"pod": "default/web"})
    try:
        code, out = run_plugin(env(), conf(agentSocket=srv.path))
        assert code == 0 and out["ips"] == PREV["ips"]
        assert srv.requests[0].startswith(b"POST /cni/add ")
        assert json.loads(srv.requests[0].split(b" ", 3)[3])["pod"]["name"] == "web"
        assert run_plugin(env("DEL", CNI_NETNS=None), conf(agentSocket=srv.path)) == (0, None)
        assert srv.requests[1].startswith(b"POST /cni/del ")
    finally:
        srv.close()


def test_plugin_passes_the_agents_refusal_on() -> None:
    srv = CannedAnswers(400, {"error": "pod default/web is run by the local cluster's pod "
                                "runtime", "cniCode": 100})
    try:
        code, out = run_plugin(env(), conf(agentSocket=srv.path))
        assert code == 1 and out["code"] == 100 and "pod runtime" in out["msg"]
    finally:
        srv.close()


def test_plugin_agent_down() -> None:
    code, out = run_plugin(env(), conf(agentSocket="/nonexistent/agent.sock"))
    assert code == 1 and out["code"] == Code.TRY_AGAIN_LATER and "not reachable" in out["msg"]
    assert "nothing was programmed" in out["details"]
    code, out = run_plugin(env("STATUS"), conf(cniVersion="1.1.0",
                                               agentSocket="/nonexistent/agent.sock"))
    assert code == 1 and out["code"] == Code.NOT_AVAILABLE


def test_plugin_agent_does_not_answer_in_time() -> None:
    srv = CannedAnswers(200, {}, answer=False)
    try:
        code, out = run_plugin(env(), conf(agentSocket=srv.path, timeoutSeconds=0.3))
        assert code == 1 and out["code"] == Code.TRY_AGAIN_LATER and "no answer in 0.3 s" in out["msg"]
    finally:
        srv.close()


def test_plugin_refuses_before_asking() -> None:
    # no pod identity: refused without a connection (the socket does not exist)
    code, out = run_plugin(env(CNI_ARGS=""), conf(agentSocket="/nonexistent/agent.sock"))
    assert code == 1 and out["code"] == Code.INVALID_ENV


def test_plugin_version() -> None:
    code, out = run_plugin({"CNI_COMMAND": "VERSION"}, {"cniVersion": "1.0.0"})
    assert code == 0 and out["supportedVersions"] == list(spec.SUPPORTED_VERSIONS)
