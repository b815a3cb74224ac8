"""Link-local addresses every node has, the same on every node."""

# Every pod routes through this address, which each node holds on its loopback (so the node
# answers ARP for it on every pod veth without proxy_arp).
POD_GATEWAY = "169.254.1.1"
# Node-local DNS, as NodeLocal DNSCache does it: the same address on every node.
NODE_DNS_IP = "169.254.20.10"
