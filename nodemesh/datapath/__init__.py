"""The eBPF datapath: the Python half of bpf/ (see docs/datapath.md).

- `libbpf`: a typed ctypes binding over the system's libbpf.so.1
- `layout`: the C structs and enums as ctypes twins, and the map key encodings
- `elf`: BTF and symbols of the compiled objects, read without libbpf
- `lb`: services -> socket-LB map entries, Maglev tables (pure)
- `loader`: `Datapath`, which builds, loads, attaches, syncs and destroys one node's datapath
"""
