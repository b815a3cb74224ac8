"""Ad-hoc hostile-neighbours measurement (issue 12 item 6), until it is a `nodemesh bench` section:
one node, a victim pod (DNS and TCP p50/p99), a DNS flood and a connection flood from another pod,
and apply → synced. Run as root from the checkout: .venv/bin/python bench/hostile_adhoc.py"""
# ruff: noqa: E501, E702
import json
import subprocess
import sys
import time

sys.path.insert(0, "/work/main")
from tests.integration.clusterharness import new_cluster
from tests.integration.test_services import deployment, service


def pod(name):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"nodeName": "node1", "containers": [
                {"name": "c", "image": "debian", "command": ["sleep", "infinity"]}]}}

VICTIM = r"""
import json, socket, struct, sys, time
name, n = sys.argv[1], int(sys.argv[2])
q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(("169.254.20.10", 53)); s.settimeout(1)
dns = []; bad = 0
for i in range(n):
    t = time.perf_counter(); s.send(struct.pack("!HHHHHH", i, 0x100, 1, 0, 0, 0) + q + b"\0\1\0\1")
    try:
        r = s.recv(512); dns.append(time.perf_counter() - t)
        bad += (r[3] & 0xF) != 0
    except socket.timeout: bad += 1
    time.sleep(0.005)
tcp = []
for i in range(n):
    t = time.perf_counter()
    c = socket.create_connection((sys.argv[3], 9090), timeout=2); c.sendall(b"ping\n"); c.recv(100); c.close()
    tcp.append(time.perf_counter() - t); time.sleep(0.005)
def pct(v, p): v = sorted(v); return round(v[min(len(v) - 1, int(p * len(v)))] * 1e3, 3)
print(json.dumps({"dns_p50": pct(dns, .5), "dns_p99": pct(dns, .99), "dns_bad": bad,
                  "tcp_p50": pct(tcp, .5), "tcp_p99": pct(tcp, .99)}))
"""
DNSFLOOD = r"""
import socket, struct, sys, time
end = time.time() + float(sys.argv[1]); q = b"\x03foo\x07default\x03svc\x07cluster\x05local\x00\0\1\0\1"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(("169.254.20.10", 53)); s.setblocking(False)
n = 0
while time.time() < end:
    for _ in range(200):
        try: s.send(struct.pack("!HHHHHH", n & 0xFFFF, 0x100, 1, 0, 0, 0) + q); n += 1
        except BlockingIOError: pass
    try:
        while True: s.recv(512)
    except BlockingIOError: pass
print(n)
"""
CONNFLOOD = r"""
import socket, struct, sys, time
end = time.time() + float(sys.argv[1]); ip = sys.argv[2]; n = 0
lg = struct.pack("ii", 1, 0)
while time.time() < end:
    for _ in range(100):
        s = socket.socket(); s.setblocking(False); s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, lg)
        try: s.connect((ip, 9999))
        except (BlockingIOError, OSError): pass
        s.close(); n += 1
print(n)
"""
c = new_cluster(1)
out = {}
try:
    c.apply([deployment("web", 1, {"app": "web"}), service("web", {"app": "web"}), pod("flood"), pod("victim")])
    c.wait_pods(count=3); c.wait_synced()
    vip = c.get("svc", "web")["spec"]["clusterIP"]
    ip = c.get("pod", "victim")["status"]["podIP"]
    name = ip.replace(".", "-") + ".default.pod.cluster.local"
    def control(i):
        c.apply([service(f"s{i}", {"app": "web"})]); return round(c.wait_synced(20) * 1e3, 1)
    for label, code, args in (("none", None, None), ("dns", DNSFLOOD, ["12"]), ("conn", CONNFLOOD, ["12", vip])):
        p = None
        if code:
            p = subprocess.Popen([sys.executable, "-m", "nodemesh", "--state-dir", c.state_dir, "exec", "flood", "--",
                                  sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
        time.sleep(1)
        r = json.loads(c.exec("victim", sys.executable, "-c", VICTIM, name, "200", vip).out)
        r["control_ms"] = control(label)
        if p:
            r["flood_sent"] = int(p.communicate()[0].strip() or 0)
        r["dns_refused_total"] = None
        out[label] = r; print(label, r, flush=True)
finally:
    c.down()
json.dump(out, sys.stdout, indent=1)
