"""`nodemesh`: the command line, in the style of kubectl.

Each subcommand is one function taking the parsed arguments; errors are `NodemeshError`s whose
message is printed as ``error: ...`` with their exit code (2 for invalid input). Commands that
change the cluster talk to the store; commands that look inside a node talk to its agent.
"""

from __future__ import annotations

import argparse
import sys

from nodemesh.errors import InvalidManifest, NodemeshError


def _add_state_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", default=argparse.SUPPRESS,
                   help="cluster state directory (default: $NODEMESH_STATE_DIR or "
                        "/var/lib/nodemesh)")


def build_parser() -> argparse.ArgumentParser:
    from nodemesh.cli import commands as c

    p = argparse.ArgumentParser(
        prog="nodemesh",
        description="A sidecar-less service mesh: eBPF for L3/L4, one Envoy per node for L7.",
        epilog="Start with `nodemesh up`, then `nodemesh apply -f app.yaml`.")
    p.add_argument("--state-dir", default=None,
                   help="cluster state directory (default: $NODEMESH_STATE_DIR or "
                        "/var/lib/nodemesh)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def cmd(name: str, fn, help: str, **kw) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help, **kw)
        _add_state_dir(sp)
        sp.set_defaults(func=fn)
        return sp

    sp = cmd("up", c.cmd_up, "create (or recover) a local cluster and start its agents")
    sp.add_argument("--nodes", type=int, default=2, help="number of nodes (default 2)")
    sp.add_argument("--name", default="nodemesh",
                    help="cluster name, prefix of its namespaces and cgroups (default nodemesh)")
    sp.add_argument("--datapath", choices=["bpf", "none"], default="bpf",
                    help="bpf: the mesh (default); none: plain routing without BPF programs "
                         "(a baseline for benchmarks: no services, no policy)")
    sp.add_argument("--mtls", choices=["on", "off"], default="on",
                    help="mutual TLS between nodes with SPIFFE workload certificates (default "
                         "on; off: pod traffic crosses the underlay in clear)")
    sp.add_argument("--trust-domain", default="cluster.local",
                    help="SPIFFE trust domain of workload identities (default cluster.local)")
    sp.add_argument("--cert-ttl", default="24h",
                    help="lifetime of workload certificates, renewed at half of it: 24h "
                         "(default), 90m, 10s ...")
    sp.add_argument("--store", choices=["sqlite", "etcd"], default=None,
                    help="where desired state lives: sqlite (default, one file) or etcd (a "
                         "real etcd cluster on the underlay, or the one --etcd-endpoints names)")
    sp.add_argument("--store-members", type=int, default=None, metavar="N",
                    help="--store etcd: how many etcd members the cluster runs, 1, 3 (default) "
                         "or 5, each in a network namespace of its own")
    sp.add_argument("--etcd-endpoints", default=None, metavar="URL,...",
                    help="--store etcd: use an etcd you run (https://HOST:PORT,...) instead of "
                         "starting members; needs --etcd-ca, --etcd-cert and --etcd-key")
    sp.add_argument("--etcd-ca", default=None, help="CA certificate of --etcd-endpoints (PEM)")
    sp.add_argument("--etcd-cert", default=None, help="client certificate for --etcd-endpoints")
    sp.add_argument("--etcd-key", default=None, help="client key for --etcd-endpoints")
    sp.add_argument("--node-lease-seconds", type=int, default=15, metavar="N",
                    help="a node whose agent has not renewed its lease for N seconds goes "
                         "NotReady and its pods leave every service (default 15, 2-3600)")
    # BPF map sizes (cluster.json "maps"; docs/reliability.md "Exhausted tables")
    sp.add_argument("--map-size", action="append", default=[], metavar="NAME=N",
                    help="size of a BPF map, e.g. nm_lb4_svc=131072 (repeatable; nm_events in "
                         "bytes); objects that do not fit are refused and reported")
    sp.add_argument("--limit", action="append", default=[], metavar="NAME=N",
                    help="a datapath budget per source, e.g. events_per_second=50000 "
                         "(repeatable; events_per_second, event_burst, dns_queries_per_second, "
                         "dns_burst; 0 = none; cluster.json \"limits\")")

    sp = cmd("down", c.cmd_down, "remove the local cluster and everything it created")
    sp.add_argument("--keep-state", action="store_true",
                    help="keep the store, so the next `up` brings the same workloads back")

    cmd("status", c.cmd_status, "show the cluster: nodes, agents, pods, services")

    sp = cmd("apply", c.cmd_apply, "create or update resources from YAML (all or nothing)")
    sp.add_argument("-f", "--filename", action="append", required=True,
                    help="a file, a directory of *.yaml/*.yml/*.json, or - for stdin")
    sp.add_argument("-n", "--namespace", default=None, help="namespace for objects without one")

    sp = cmd("delete", c.cmd_delete, "delete resources by file or by kind and name")
    sp.add_argument("kind", nargs="?", help="kind (pod, svc, deploy, netpol, cnp, httproute, ...)")
    sp.add_argument("names", nargs="*", help="names")
    sp.add_argument("-f", "--filename", action="append", help="delete what these files define")
    sp.add_argument("-n", "--namespace", default=None)
    sp.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                    help="wait until deleted pods are gone (default: wait)")
    sp.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    sp.add_argument("--ignore-not-found", action="store_true")

    sp = cmd("get", c.cmd_get, "list resources")
    sp.add_argument("kind", help="kind (pods, svc, deploy, nodes, ns, netpol, cnp, httproute, "
                                 "grpcroute, identities, all)")
    sp.add_argument("name", nargs="?")
    sp.add_argument("-n", "--namespace", default=None)
    sp.add_argument("-A", "--all-namespaces", action="store_true")
    sp.add_argument("-o", "--output", choices=["wide", "yaml", "json", "name"])
    sp.add_argument("-l", "--selector", help="label selector, e.g. app=web,tier!=db")

    sp = cmd("describe", c.cmd_describe, "show one resource in detail")
    sp.add_argument("kind")
    sp.add_argument("name")
    sp.add_argument("-n", "--namespace", default=None)

    sp = cmd("exec", c.cmd_exec, "run a command in a pod (its network, mounts and cgroup)",
             usage="nodemesh exec [-n NS] [-c CONTAINER] POD -- COMMAND [ARG...]")
    sp.add_argument("-n", "--namespace", default=None)
    sp.add_argument("-c", "--container", default=None)
    sp.add_argument("-i", "--stdin", action="store_true", help="accepted for kubectl habits")
    sp.add_argument("-t", "--tty", action="store_true", help="accepted for kubectl habits")
    sp.add_argument("pod")
    sp.add_argument("cmd", nargs=argparse.REMAINDER)

    sp = cmd("logs", c.cmd_logs, "print a pod's container output")
    sp.add_argument("pod")
    sp.add_argument("-n", "--namespace", default=None)
    sp.add_argument("-c", "--container", default=None)
    sp.add_argument("-f", "--follow", action="store_true")
    sp.add_argument("-p", "--previous", action="store_true",
                    help="the output of the previous run of a restarted container")
    sp.add_argument("--tail", type=int, default=-1)

    sp = cmd("observe", c.cmd_observe, "show flows from every node, as `hubble observe` does")
    sp.add_argument("-f", "--follow", action="store_true", help="keep printing new flows")
    sp.add_argument("--last", type=int, default=None, help="the last N flows (default 20)")
    sp.add_argument("--since", help="flows since a time (RFC 3339) or a duration ago (5m)")
    sp.add_argument("--until", help="flows until a time (RFC 3339) or a duration ago")
    sp.add_argument("-o", "--output", choices=["compact", "json", "table"], default="compact")
    sp.add_argument("--node", action="append", help="only flows seen by this node")
    for flag, helptext in (
            ("--pod", "[namespace/]pod-name prefix, either side"),
            ("--from-pod", "source pod"), ("--to-pod", "destination pod"),
            ("--label", "label selector, either side"), ("--from-label", "source labels"),
            ("--to-label", "destination labels"),
            ("--service", "[namespace/]service, either side"),
            ("--to-service", "destination service"),
            ("--verdict", "FORWARDED, DROPPED, REDIRECTED, TRANSLATED"),
            ("--type", "trace, drop or l7"), ("--protocol", "tcp, udp, icmp, http, grpc"),
            ("--http-status", "a code (404) or a class (5+)"), ("--http-method", "GET, POST..."),
            ("--http-path", "a regular expression over the path"),
            ("--identity", "a numeric security identity, either side")):
        sp.add_argument(flag, action="append", default=[], help=helptext)
    sp.add_argument("-n", "--namespace", dest="flow_namespace", action="append", default=[],
                    help="namespace, either side")

    sp = cmd("ca", c.cmd_ca, "the cluster's certificate authority: status, rotate")
    sp.add_argument("what", choices=["status", "rotate"])
    sp.add_argument("-o", "--output", choices=["text", "json"], default="text")
    sp.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                    help="rotate: wait until every node renewed and the old root is retired")
    sp.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (default 300)")

    sp = cmd("proxy", c.cmd_proxy, "the node Envoy's admin data, through its agent; `restart`: "
             "a planned restart (hot restart: no connection refused, HTTP drained)")
    sp.add_argument("what", choices=["stats", "clusters", "config", "restart"])
    sp.add_argument("--node", default=None, help="which node (default: every node)")
    sp.add_argument("--filter", default=None, help="stats: a regular expression over the names")
    sp.add_argument("--drain-seconds", type=int, default=5,
                    help="restart: how long the old Envoy drains (default 5)")
    sp.add_argument("--parent-shutdown-seconds", type=int, default=20,
                    help="restart: when the old Envoy exits, closing what is still open "
                         "(default 20)")

    sp = cmd("demo", c.cmd_demo, "bring up a 2-node cluster, deploy a demo app with policies "
             "and a canary, drive traffic and report what the mesh saw")
    sp.add_argument("--requests", type=int, default=400, help="requests to drive (default 400)")
    sp.add_argument("-o", "--output", choices=["text", "json"], default="text")

    sp = cmd("ui", c.cmd_ui, "serve the live service map on http://127.0.0.1:9970/")
    sp.add_argument("--address", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=9970)
    sp.add_argument("--window", type=int, default=60, help="seconds of flows shown (default 60)")

    # Everything after `bench` belongs to the benchmark's own parser (nodemesh.bench.run), which
    # also answers --help. argparse.REMAINDER cannot start with an option (`bench --quick` would
    # land in the unrecognized arguments), so this subparser has no options at all and a prefix
    # character no argument uses: every word, dashes or not, is a positional of bench_args.
    bench_help = ("run the side-by-side benchmark (no mesh, sidecars, nodemesh L4 and L7); "
                  "results in docs/benchmarks.md")
    sp = sub.add_parser("bench", help=bench_help, description=bench_help, add_help=False,
                        prefix_chars="\0", usage="nodemesh bench [--quick] [--out DIR] [OPTION...] "
                        "(nodemesh bench --help lists them)")
    sp.set_defaults(func=c.cmd_bench)
    sp.add_argument("bench_args", nargs=argparse.REMAINDER,
                    help="options of the benchmark (--quick, --out DIR; see --help there)")

    sp = cmd("agent", c.cmd_agent, "run a node's agent (started by the cluster daemon, or by "
             "the nodemesh-agent DaemonSet with --kubernetes); hold: the daemon does not start "
             "it again when it exits; release: it does")
    sp.add_argument("action", nargs="?", choices=["hold", "release"], default=None)
    sp.add_argument("--node", help="the node (with --kubernetes: default $NODE_NAME)")
    sp.add_argument("--kubernetes", action="store_true",
                    help="Kubernetes mode: the API server is the store, the kubelet runs the pods")
    sp.add_argument("--kubeconfig", help="with --kubernetes: a kubeconfig (default: the pod's "
                    "service account, else $KUBECONFIG)")
    sp.add_argument("--config", default="/etc/nodemesh/cluster.json",
                    help="with --kubernetes: the cluster's settings (the ConfigMap's cluster.json)")
    sp.add_argument("--pods", choices=("all", "node"), default="all",
                    help="with --kubernetes: follow every Pod (default) or only this node's "
                    "(a spec.nodeName field selector)")
    sp = cmd("cni-config", c.cmd_cni_config, "print a CNI network configuration list for a node: "
             "ptp and host-local (from the node's CNI address range), then nodemesh-cni")
    sp.add_argument("--node", required=True, help="the node whose namespace runs the CNI chain")
    sp.add_argument("--network", default="nodemesh", help="the network's name (default nodemesh)")
    sp.add_argument("--pod", default=None, metavar="NAMESPACE/NAME",
                    help="put the pod's identity in nodemesh-cni's args (for a runtime that "
                         "passes no CNI_ARGS, such as ctr)")
    cmd("daemon", c.cmd_daemon, "run the cluster daemon (started by `nodemesh up`)")
    cmd("version", c.cmd_version, "print the version")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # kubectl accepts flags between positionals (`delete svc -n prod web`); argparse stops
    # filling positionals at the first flag, so hand the rest over here.
    if extra and not any(e.startswith("-") for e in extra):
        if getattr(args, "command", None) == "delete":
            args.names = [*args.names, *extra]
            extra = []
        elif getattr(args, "command", None) in ("get", "describe") and len(extra) == 1 \
                and getattr(args, "name", None) is None:
            args.name = extra[0]
            extra = []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except InvalidManifest as e:
        print(e.message, file=sys.stderr)
        return e.exit_code
    except NodemeshError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
