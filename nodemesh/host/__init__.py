"""Host plumbing: the thin wrappers over the machine that the local cluster and the agent use.

- `netns`: network namespaces and links (iproute2, setns(2));
- `cgroup`: the cgroup v2 hierarchy: find it, create and remove groups, move and kill processes;
- `procs`: processes by PID and start time, detached spawning, reaping;
- `sandbox`: one pod's network namespace, veth, address and cgroup;
- `files`: JSON state files written atomically.

Nothing here knows about clusters, nodes or resources: callers decide names and addresses.
"""
