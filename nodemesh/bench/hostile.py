"""Programs a hostile-neighbour measurement runs inside pods (`python -c PROGRAM ARGS`): the
bench's `hostile` section and tests/integration/test_hostile.py use the same ones.

- `LOOKUPS NAME N`: N sequential A lookups of NAME at the node-local DNS, 5 ms apart, each with a
  1 s timeout; prints JSON: n, lost, rcodes (answers by rcode), p50_ms, p99_ms.
- `DNS_FLOOD SECONDS`: A queries as fast as it can for SECONDS, never awaiting the answers (it
  reads what comes back only to keep its socket's queue empty); prints how many it sent.
"""

LOOKUPS = r"""
import collections, json, socket, struct, sys, time
name, n = sys.argv[1], int(sys.argv[2])
q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00\x00\x01\x00\x01"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("169.254.20.10", 53))
s.settimeout(1)
ms, lost, rcodes = [], 0, collections.Counter()
for i in range(n):
    t = time.perf_counter()
    s.send(struct.pack("!HHHHHH", i, 0x0100, 1, 0, 0, 0) + q)
    try:
        while True:
            r = s.recv(512)
            if struct.unpack("!H", r[:2])[0] == i:
                break
        ms.append((time.perf_counter() - t) * 1000)
        rcodes[str(r[3] & 0xF)] += 1
    except socket.timeout:
        lost += 1
    time.sleep(0.005)
ms.sort()
pct = lambda p: round(ms[min(len(ms) - 1, int(p * len(ms)))], 3) if ms else None
print(json.dumps({"n": n, "lost": lost, "rcodes": rcodes, "p50_ms": pct(0.5),
                  "p99_ms": pct(0.99)}))
"""

DNS_FLOOD = r"""
import socket, struct, sys, time
end = time.monotonic() + float(sys.argv[1])
q = b"\x03foo\x07default\x03svc\x07cluster\x05local\x00\x00\x01\x00\x01"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("169.254.20.10", 53))
s.setblocking(False)
n = 0
while time.monotonic() < end:
    for _ in range(100):
        try:
            s.send(struct.pack("!HHHHHH", n & 0xFFFF, 0x0100, 1, 0, 0, 0) + q)
            n += 1
        except BlockingIOError:
            pass
    try:
        while True:
            s.recv(512)
    except BlockingIOError:
        pass
print(n)
"""
