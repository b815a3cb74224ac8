"""The cluster daemon: supervises the node agents, runs the cluster-level controllers and DNS.

One per local cluster, started by `nodemesh up`. It is a child subreaper, so pod shims and proxies
that outlive an agent are reparented to it and reaped here. It restarts an agent that dies (with
backoff) and reconciles Deployments, scheduling and garbage collection whenever the store changes.
It serves the cluster's DNS on every node's node-local address, so no lookup depends on an agent.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time

from nodemesh.cluster.config import NODE_DNS_IP, ClusterConfig
from nodemesh.cluster.controllers import Controllers
from nodemesh.cluster.dns import ClusterDns
from nodemesh.cluster.etcdmembers import MemberSupervisor
from nodemesh.host import netns, procs
from nodemesh.host.files import read_json, write_json_atomic
from nodemesh.host.procs import ProcRef
from nodemesh.store import open_store
from nodemesh.store.informer import Informer

log = logging.getLogger("nodemesh.daemon")
CONTROLLER_RESYNC_SECONDS = 2.0


def agent_argv(cfg: ClusterConfig, node: str) -> list[str]:
    return [sys.executable, "-m", "nodemesh", "--state-dir", cfg.state_dir, "agent",
            "--node", node]


def ready_agent(cfg: ClusterConfig, node: str) -> ProcRef | None:
    return ProcRef.from_json(read_json(cfg.agent_ready_file(node)))


def bind_node_dns(cfg: ClusterConfig, node: str) -> tuple[socket.socket, socket.socket]:
    """UDP and TCP sockets on port 53 of the node-local DNS address, bound in `node`'s namespace
    (from a thread of their own: setns is per thread, and ours stays where it is)."""
    made: list = []

    def bind() -> None:
        try:
            netns.enter_netns(cfg.node_netns(node))
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            udp.bind((NODE_DNS_IP, 53))
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((NODE_DNS_IP, 53))
            tcp.listen(128)
            made.extend((udp, tcp))
        except OSError as e:
            made.append(e)

    t = threading.Thread(target=bind)
    t.start()
    t.join()
    if isinstance(made[0], OSError):
        raise made[0]
    return made[0], made[1]


def start_cluster_dns(cfg: ClusterConfig, informer: Informer) -> ClusterDns:
    """The cluster's DNS on every node's node-local address (nodemesh/cluster/dns.py)."""
    dns = ClusterDns(informer, cfg.dns_counters_file)
    dns.start()
    for n in cfg.nodes:
        try:
            dns.serve(n.name, bind_node_dns(cfg, n.name))
        except OSError as e:
            log.error("node %s: cannot serve DNS on %s:53: %s", n.name, NODE_DNS_IP, e)
    return dns


class AgentSupervisor:
    """Keeps one agent process per node alive, adopting one that is already running."""

    def __init__(self, cfg: ClusterConfig, node: str) -> None:
        self.cfg = cfg
        self.node = node
        self.ref: ProcRef | None = ProcRef.from_json(
            read_json(os.path.join(cfg.node_dir(node), "agent.json")))
        if self.ref is not None and not self.ref.alive():
            self.ref = None
        self.backoff = 0.0
        self.next_start = 0.0
        self.restarts = 0

    def check(self, now: float) -> None:
        if self.ref is not None and self.ref.alive():
            return
        if self.ref is not None:  # it died
            was_ready = ready_agent(self.cfg, self.node) == self.ref
            self.ref = None
            # An agent that died before it was ready is crash-looping: back off. One that was
            # ready (killed, OOM, a bug in a later reconcile) comes back at once: the node's
            # changes wait for it.
            self.backoff = 0.0 if was_ready else min(max(self.backoff * 2, 0.2), 5.0)
            self.next_start = now + self.backoff
            self.restarts += 1
            log.warning("agent of %s exited (%s ready); restarting in %.1fs", self.node,
                        "was" if was_ready else "never", self.backoff)
        if now >= self.next_start:
            self.start()

    def start(self) -> None:
        node_dir = self.cfg.node_dir(self.node)
        os.makedirs(node_dir, exist_ok=True)
        log_path = os.path.join(node_dir, "agent.log")
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        # glibc gives every thread its own malloc arena (64 MiB each, kept once touched): the
        # agent's few threads would otherwise triple its resident memory.
        actions = [(os.POSIX_SPAWN_DUP2, fd, 1), (os.POSIX_SPAWN_DUP2, fd, 2)]
        env = {**os.environ, "MALLOC_ARENA_MAX": "2",
               # The agent forks (pod shims, Envoy) while gRPC threads run; gRPC's fork
               # handlers then crash the child now and then. The children exec at once and
               # need none of gRPC's state.
               "GRPC_ENABLE_FORK_SUPPORT": "false"}
        # From the host's namespace (where this process started), even when the daemon moved
        # to the store's: the agent binds its metrics on the host's loopback before it enters
        # its node.
        pid = netns.in_original_netns(os.posix_spawn, sys.executable,
                                      agent_argv(self.cfg, self.node), env,
                                      file_actions=actions, setsid=True)
        os.close(fd)
        self.ref = ProcRef.of(pid)
        log.info("started agent of %s (pid %d)", self.node, pid)

    def stop(self) -> None:
        procs.stop(self.ref, grace=10)


def _wait_store(cfg: ClusterConfig, members: list[MemberSupervisor],
                stopping: threading.Event) -> None:
    """Start the etcd members and wait until they are healthy, then seed the store."""
    from nodemesh.cluster.etcdmembers import health
    from nodemesh.cluster.lifecycle import seed_store

    last_log = time.monotonic()
    while members and not stopping.is_set():
        procs.record_reaped(cfg.reaped_file, procs.reap_children())
        for m in members:
            m.check(time.monotonic())
        h = health(cfg.store)
        if all(e["healthy"] for e in h) and any(e["leader"] for e in h):
            break
        if time.monotonic() - last_log > 10:
            last_log = time.monotonic()
            log.warning("waiting for the etcd members: %s",
                        ", ".join(f"{e.get('name')} {e['error'] or 'unhealthy'}" for e in h))
        stopping.wait(0.3)
    seed_store(cfg)


def run_daemon(cfg: ClusterConfig) -> int:
    # First, while this process has one thread: into the namespace the store is reached from
    # (the underlay's, for the cluster's own etcd); every thread started later is there too.
    netns.enter_for_store(cfg.store)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    procs.set_child_subreaper()
    me = ProcRef.of(os.getpid())
    assert me is not None
    write_json_atomic(os.path.join(cfg.state_dir, "daemon.json"), me.to_json())
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())

    members = [MemberSupervisor(cfg, m) for m in cfg.store_members]
    if cfg.store_type == "etcd":
        _wait_store(cfg, members, stopping)
    store = open_store(cfg.state_dir)
    changed = threading.Event()
    informer = Informer(store)
    informer.add_listener(
        lambda kinds: changed.set() if kinds & {"Deployment", "Pod", "Namespace", "*"} else None)
    informer.start()
    controllers = Controllers(store, [n.name for n in cfg.nodes])
    dns = start_cluster_dns(cfg, informer)
    trust = None
    if cfg.mtls:
        from nodemesh.cluster.trust import Trust

        trust = Trust(cfg, store)
        trust.start()
        informer.add_listener(
            lambda kinds: changed.set() if kinds & {"TrustBundle", "Node"} else None)
    agents = [AgentSupervisor(cfg, n.name) for n in cfg.nodes]
    log.info("daemon of cluster %s up (pid %d)", cfg.name, os.getpid())
    last_sync = 0.0
    while not stopping.is_set():
        procs.record_reaped(cfg.reaped_file, procs.reap_children())
        now = time.monotonic()
        for m in members:
            m.check(now)
        for a in agents:
            a.check(now)
        if changed.is_set() or now - last_sync > CONTROLLER_RESYNC_SECONDS:
            changed.clear()
            last_sync = now
            try:
                controllers.sync()
            except Exception:
                log.exception("controllers failed; retrying")
            if trust is not None:
                try:
                    trust.step()
                except Exception:
                    log.exception("CA rotation step failed; retrying")
        changed.wait(0.05)
    if trust is not None:
        trust.stop()
    log.info("stopping agents")
    for a in agents:
        if a.ref is not None:
            a.ref.signal(signal.SIGTERM)
    for a in agents:
        a.stop()
    dns.stop()
    informer.stop()
    # Reap what is left of ours before we go (shims stopped by `down` are reparented here).
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        procs.reap_children()
        time.sleep(0.05)
    return 0
