"""The eBPF datapath: the Python half of bpf/ (see docs/datapath.md).

- `libbpf`: a typed ctypes binding over the system's libbpf.so.1
- `layout`: the C structs and enums as ctypes twins, and the map key encodings
- `elf`: BTF and symbols of the compiled objects, read without libbpf
- `lb`: services -> socket-LB map entries, Maglev tables (pure)
- `build`: compile bpf/*.bpf.c into the objects
- `pins`: one node's pinned maps and links on bpffs, and their adoption by a new agent
- `attach`: the programs on the node's cgroup and namespace, pod veths, underlay, proxy cgroup
- `maps`: typed map handles, writes by diff, the service LB, events and counters
- `loader`: `Datapath`, the facade over those four: builds, loads, attaches, syncs and destroys
  one node's datapath
"""
