"""The local cluster's etcd: its members, their certificates, how they run and how healthy they are.

`nodemesh up --store etcd --store-members N` gives the cluster a real etcd cluster of N members
(Debian's etcd-server): each member is a network namespace of its own (`<name>-etcd1` ...) on the
underlay, at 172.30.0.21 and up, with peer and client TLS (and client certificates required)
from a CA of its own under `<state>/etcd/pki/`. The cluster daemon starts the members and
restarts one that dies (`MemberSupervisor`), as it does the agents. Agents reach the members from
their node's namespace over the underlay; the daemon and the CLI from the underlay's namespace,
which holds an address on the bridge for that (`nodemesh.host.netns.enter_for_store`): nothing
connects to a member from the host's namespace.

`--etcd-endpoints` with `--etcd-ca/--etcd-cert/--etcd-key` uses an etcd the user runs instead: it
is recorded as given, with no members (docs/store.md).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta

from nodemesh.cluster.config import ETCD_MEMBER_BASE, STORE_ACCESS_IP, UNDERLAY_CIDR, ClusterConfig
from nodemesh.errors import NodemeshError
from nodemesh.host import netns, procs
from nodemesh.host.files import read_json, write_json_atomic
from nodemesh.host.procs import ProcRef

log = logging.getLogger("nodemesh.etcd")

STORE_TYPES = ("sqlite", "etcd")
MEMBER_COUNTS = (1, 3, 5)
CLIENT_PORT = 2379
PEER_PORT = 2380
MAX_TXN_OPS = 10000  # etcd's default is 128 operations per transaction
ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"
PKI_VALIDITY_DAYS = 3650


# ---- planning (pure but for checking that given files exist) -----------------------------------
def plan_store(name: str, state_dir: str, store_type: str = "sqlite", members: int | None = None,
               endpoints: str | None = None, ca: str | None = None, cert: str | None = None,
               key: str | None = None) -> dict:
    """The ``store`` record of cluster.json for `up`'s flags; a NodemeshError (exit 2) naming the
    flag for anything wrong, before anything is created."""
    external = [f for f, v in (("--etcd-endpoints", endpoints), ("--etcd-ca", ca),
                               ("--etcd-cert", cert), ("--etcd-key", key)) if v]
    if store_type not in STORE_TYPES:
        raise NodemeshError(f"--store {store_type!r}: must be one of {', '.join(STORE_TYPES)}", 2)
    if store_type == "sqlite":
        if members is not None:
            raise NodemeshError("--store-members: only with --store etcd", 2)
        if external:
            raise NodemeshError(f"{external[0]}: only with --store etcd", 2)
        return {"type": "sqlite"}
    if endpoints:
        if members is not None:
            raise NodemeshError("--store-members: not with --etcd-endpoints (the cluster runs "
                                "no members of an etcd you run)", 2)
        return _plan_external(endpoints, ca, cert, key)
    if external:
        raise NodemeshError(f"{external[0]}: only with --etcd-endpoints", 2)
    n = 3 if members is None else members
    if n not in MEMBER_COUNTS:
        raise NodemeshError(f"--store-members {n}: must be 1, 3 or 5 (an odd number keeps a "
                            "quorum through the loss of (N-1)/2 members)", 2)
    hosts = list(ipaddress.ip_network(UNDERLAY_CIDR).hosts())
    planned = [{"name": f"etcd{i}", "ip": str(hosts[ETCD_MEMBER_BASE + i - 2]),
                "netns": f"{name}-etcd{i}"} for i in range(1, n + 1)]
    pki = os.path.join(state_dir, "etcd", "pki")
    return {"type": "etcd",
            "endpoints": [f"https://{m['ip']}:{CLIENT_PORT}" for m in planned],
            "ca": os.path.join(pki, "ca.crt"), "cert": os.path.join(pki, "client.crt"),
            "key": os.path.join(pki, "client.key"), "members": planned,
            "access_netns": f"{name}-underlay", "access_ip": STORE_ACCESS_IP}


def _plan_external(endpoints: str, ca: str | None, cert: str | None, key: str | None) -> dict:
    urls = [u.strip() for u in endpoints.split(",") if u.strip()]
    if not urls:
        raise NodemeshError("--etcd-endpoints: give one URL or more, comma-separated", 2)
    for u in urls:
        scheme, _, rest = u.partition("://")
        if scheme not in ("https", "http") or not rest or "/" in rest.rstrip("/"):
            raise NodemeshError(f"--etcd-endpoints {u!r}: want https://HOST:PORT", 2)
    paths = {}
    for flag, v in (("--etcd-ca", ca), ("--etcd-cert", cert), ("--etcd-key", key)):
        if not v:
            raise NodemeshError(f"{flag}: required with --etcd-endpoints", 2)
        if not os.path.isfile(v):
            raise NodemeshError(f"{flag} {v}: no such file", 2)
        paths[flag] = os.path.abspath(v)
    return {"type": "etcd", "endpoints": urls, "ca": paths["--etcd-ca"],
            "cert": paths["--etcd-cert"], "key": paths["--etcd-key"], "members": []}


def check_installed() -> None:
    missing = [p for p in (ETCD, ETCDCTL) if not os.access(p, os.X_OK)]
    if missing:
        raise NodemeshError(f"--store etcd runs etcd members, but {', '.join(missing)} is missing: "
                            "install Debian's etcd-server and etcd-client (`make setup`)")


def external_warnings(store: dict) -> list[str]:
    """What an etcd the user runs cannot do for a local cluster: agents run in their nodes'
    namespaces, whose loopback is their own and which have no uplink."""
    import ipaddress as ip

    out = []
    for u in store.get("endpoints") or []:
        host = u.partition("://")[2].rsplit(":", 1)[0].strip("[]")
        try:
            addr = ip.ip_address(host)
        except ValueError:
            addr = None
        if (addr is not None and addr.is_loopback) or host == "localhost":
            out.append(f"{u} is on the host's loopback: the nodes' agents (in their own network "
                       "namespaces) cannot reach it, only the daemon and the CLI can")
        elif addr is None or addr not in ip.ip_network(UNDERLAY_CIDR):
            out.append(f"{u}: the local cluster's nodes have no uplink, so their agents reach "
                       "only addresses on the underlay")
    return out


# ---- certificates --------------------------------------------------------------------------
def ensure_pki(cfg: ClusterConfig) -> bool:
    """The etcd CA, one certificate per member (server and peer, for its address) and the
    client certificate agents, the daemon and the CLI present; keys 0600. False if present."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from nodemesh.certs.authority import write_atomic
    from nodemesh.certs.pem import cert_pem, key_to_pem

    pki = os.path.join(cfg.etcd_dir, "pki")
    if os.path.exists(os.path.join(pki, "ca.crt")):
        return False
    os.makedirs(cfg.etcd_dir, mode=0o700, exist_ok=True)
    os.makedirs(pki, mode=0o700, exist_ok=True)
    now = datetime.now(UTC).replace(microsecond=0)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"nodemesh {cfg.name} etcd CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - timedelta(minutes=5))
          .not_valid_after(now + timedelta(days=PKI_VALIDITY_DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, sans: list[x509.GeneralName], usages: list) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(ca_name).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - timedelta(minutes=5))
             .not_valid_after(now + timedelta(days=PKI_VALIDITY_DAYS))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                 ca_key.public_key()), False))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return cert_pem(b.sign(ca_key, hashes.SHA256())), key_to_pem(key)

    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    for m in cfg.store_members:
        crt, key = leaf(m["name"], [x509.DNSName(m["name"]),
                                    x509.IPAddress(ipaddress.ip_address(m["ip"]))], both)
        write_atomic(os.path.join(pki, f"{m['name']}.crt"), crt, 0o644)
        write_atomic(os.path.join(pki, f"{m['name']}.key"), key, 0o600)
    crt, key = leaf("nodemesh-client", [], [ExtendedKeyUsageOID.CLIENT_AUTH])
    write_atomic(os.path.join(pki, "client.crt"), crt, 0o644)
    write_atomic(os.path.join(pki, "client.key"), key, 0o600)
    write_atomic(os.path.join(pki, "ca.key"), key_to_pem(ca_key), 0o600)
    write_atomic(os.path.join(pki, "ca.crt"), cert_pem(ca), 0o644)  # last: marks it complete
    return True


# ---- running the members ---------------------------------------------------------------------
def member_dir(cfg: ClusterConfig, member: str) -> str:
    return os.path.join(cfg.etcd_dir, member)


def member_argv(cfg: ClusterConfig, member: dict) -> list[str]:
    """etcd for one member: TLS with client certificates required for clients and peers, on
    its underlay address only."""
    pki = os.path.join(cfg.etcd_dir, "pki")
    ip, name = member["ip"], member["name"]
    initial = ",".join(f"{m['name']}=https://{m['ip']}:{PEER_PORT}" for m in cfg.store_members)
    return [
        ETCD, "--name", name, "--data-dir", os.path.join(member_dir(cfg, name), "data"),
        "--listen-client-urls", f"https://{ip}:{CLIENT_PORT}",
        "--advertise-client-urls", f"https://{ip}:{CLIENT_PORT}",
        "--listen-peer-urls", f"https://{ip}:{PEER_PORT}",
        "--initial-advertise-peer-urls", f"https://{ip}:{PEER_PORT}",
        "--initial-cluster", initial, "--initial-cluster-state", "new",
        "--initial-cluster-token", f"nodemesh-{cfg.name}",
        "--cert-file", os.path.join(pki, f"{name}.crt"),
        "--key-file", os.path.join(pki, f"{name}.key"),
        "--trusted-ca-file", os.path.join(pki, "ca.crt"), "--client-cert-auth",
        "--peer-cert-file", os.path.join(pki, f"{name}.crt"),
        "--peer-key-file", os.path.join(pki, f"{name}.key"),
        "--peer-trusted-ca-file", os.path.join(pki, "ca.crt"), "--peer-client-cert-auth",
        # One `nodemesh apply` is one transaction (all or nothing): room for a large manifest.
        "--max-txn-ops", str(MAX_TXN_OPS),
        "--logger", "zap", "--log-outputs", "stderr",
    ]


def member_ref(cfg: ClusterConfig, member: str) -> ProcRef | None:
    ref = ProcRef.from_json(read_json(os.path.join(member_dir(cfg, member), "member.json")))
    return ref if ref is not None and ref.alive() else None


class MemberSupervisor:
    """Keeps one etcd member running in its namespace, adopting one that already runs; one
    that dies comes back at once, or after a growing pause if it keeps dying young."""

    YOUNG_SECONDS = 10.0

    def __init__(self, cfg: ClusterConfig, member: dict) -> None:
        self.cfg = cfg
        self.member = member
        self.ref = member_ref(cfg, member["name"])
        self.started_at = 0.0
        self.backoff = 0.0
        self.next_start = 0.0
        self.restarts = 0

    def check(self, now: float) -> None:
        if self.ref is not None and self.ref.alive():
            return
        if self.ref is not None:
            young = now - self.started_at < self.YOUNG_SECONDS
            self.backoff = min(max(self.backoff * 2, 0.5), 10.0) if young else 0.0
            self.next_start = now + self.backoff
            self.restarts += 1
            self.ref = None
            log.warning("etcd member %s exited; restarting in %.1fs", self.member["name"],
                        self.backoff)
        if now >= self.next_start:
            self.start()

    def start(self) -> None:
        name = self.member["name"]
        d = member_dir(self.cfg, name)
        os.makedirs(d, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(d, "etcd.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "ETCD_UNSUPPORTED_ARCH": ""}
        try:
            # In a thread that entered the member's namespace: the child starts there.
            pid = netns.in_netns_thread(
                netns.netns_path(self.member["netns"]), os.posix_spawn, ETCD,
                member_argv(self.cfg, self.member), env,
                file_actions=[(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, fd, 1),
                              (os.POSIX_SPAWN_DUP2, fd, 2)], setsid=True)
        finally:
            os.close(fd)
            os.close(null)
        self.ref = ProcRef.of(pid)
        self.started_at = time.monotonic()
        if self.ref is not None:
            write_json_atomic(os.path.join(d, "member.json"),
                              {**self.ref.to_json(), "restarts": self.restarts})
        log.info("started etcd member %s (pid %d) in %s", name, pid, self.member["netns"])


def stop_members(cfg: ClusterConfig) -> None:
    """Stop the members by their recorded PIDs (SIGTERM, then SIGKILL)."""
    refs = [member_ref(cfg, m["name"]) for m in cfg.store_members]
    for r in refs:
        if r is not None:
            r.signal(signal.SIGTERM)
    for r in refs:
        procs.stop(r, grace=10)


# ---- health ----------------------------------------------------------------------------------
def etcdctl_argv(store: dict, *args: str, endpoints: list[str] | None = None) -> list[str]:
    return [ETCDCTL, "--endpoints", ",".join(endpoints or store["endpoints"]),
            "--cacert", store["ca"], "--cert", store["cert"], "--key", store["key"],
            "--dial-timeout", "2s", "--command-timeout", "3s", *args]


def _etcdctl_command(store: dict, *args: str, endpoints: list[str] | None = None) -> list[str]:
    argv = etcdctl_argv(store, *args, endpoints=endpoints)
    if store.get("access_netns"):
        argv = ["ip", "netns", "exec", store["access_netns"], *argv]
    return argv


_ETCDCTL_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "ETCDCTL_API": "3"}


def etcdctl(store: dict, *args: str, endpoints: list[str] | None = None,
            timeout: float = 10) -> subprocess.CompletedProcess:
    """etcdctl with the cluster's client certificate, run where the store is reached: in the
    underlay's namespace for the cluster's own members (never from the host's)."""
    return subprocess.run(_etcdctl_command(store, *args, endpoints=endpoints),
                          capture_output=True, text=True, timeout=timeout, env=_ETCDCTL_ENV)


def _etcdctl_both(store: dict, *commands: tuple[str, ...],
                  timeout: float = 10) -> list[subprocess.CompletedProcess]:
    """Several etcdctl commands at once (an unreachable member costs one timeout, not one each)."""
    ps = [subprocess.Popen(_etcdctl_command(store, *c), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=_ETCDCTL_ENV) for c in commands]
    out = []
    for c, p in zip(commands, ps, strict=True):
        try:
            so, se = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            so, se = p.communicate()
        out.append(subprocess.CompletedProcess(list(c), p.returncode, so, se))
    return out


def health(store: dict) -> list[dict]:
    """Per endpoint: {"endpoint", "healthy", "leader", "error", and the member's "name", "ip",
    "netns" when the cluster runs it}."""
    eps = list(store.get("endpoints") or [])
    by_ep = {f"https://{m['ip']}:{CLIENT_PORT}": m for m in store.get("members") or []}
    out = {e: {"endpoint": e, "healthy": False, "leader": False, "error": "", **by_ep.get(e, {})}
           for e in eps}
    try:
        h, status_p = _etcdctl_both(store, ("endpoint", "health", "-w", "json"),
                               ("endpoint", "status", "-w", "json"))
        for item in json.loads(h.stdout or "[]"):
            e = out.get(item.get("endpoint"))
            if e is not None:
                e["healthy"] = bool(item.get("health"))
                e["error"] = item.get("error") or ""
        for item in json.loads(status_p.stdout or "[]"):
            e = out.get(item.get("Endpoint"))
            st = item.get("Status") or {}
            if e is not None and st:
                e["leader"] = st.get("leader") == (st.get("header") or {}).get("member_id")
                e["revision"] = (st.get("header") or {}).get("revision")
        if h.returncode != 0 and not h.stdout.strip():
            msg = (h.stderr.strip().splitlines() or ["etcdctl failed"])[-1]
            for e in out.values():
                e["error"] = e["error"] or msg
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        for e in out.values():
            e["error"] = e["error"] or str(exc)
    return [out[e] for e in eps]


def wait_healthy(cfg: ClusterConfig, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        h = health(cfg.store)
        if h and all(e["healthy"] for e in h) and any(e["leader"] for e in h):
            return
        if time.monotonic() > deadline:
            bad = ", ".join(f"{e.get('name') or e['endpoint']} ({e['error'] or 'unhealthy'})"
                            for e in h if not e["healthy"])
            logs = ", ".join(os.path.join(member_dir(cfg, m["name"]), "etcd.log")
                             for m in cfg.store_members)
            raise NodemeshError(f"etcd members not healthy after {timeout:.0f}s: {bad or 'no leader'}"
                                f"; see {logs}")
        time.sleep(0.3)
