"""The `nginx` image: Debian's nginx as a fast static responder, with a config of its own per pod.

Pods share the host's filesystem, so each nginx gets a private directory for its pid file, logs
and temp files. It answers `GET /` with a short body and `GET /16k` (and `/size/N` for N in
{1k, 4k, 16k, 64k}) with a body of that size: the benchmark's "fast static responder".
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

SIZES = {"1k": 1024, "4k": 4096, "16k": 16384, "64k": 65536}


def config(root: str, port: int, workers: int) -> str:
    return f"""
daemon off;
user root;  # files live under the pod directory, which only root can reach
worker_processes {workers};
pid {root}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    server {{
        listen {port} reuseport backlog=4096;
        root {root}/www;
        location = / {{ default_type text/plain; return 200 "ok\\n"; }}
        location /size/ {{ default_type application/octet-stream; }}
        location = /16k {{ rewrite ^ /size/16k last; }}
    }}
}}
"""


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="nginx (nodemesh image)")
    ap.add_argument("--port", type=int, default=80)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        print("nodemesh: the nginx image needs Debian's nginx (apt-get install nginx-light)",
              file=sys.stderr)
        return 127
    # Under the pod's own directory, which goes with the pod.
    base = os.environ.get("NODEMESH_POD_DIR")
    root = tempfile.mkdtemp(prefix="nginx-", dir=base) if base else tempfile.mkdtemp(
        prefix="nodemesh-nginx-")
    os.makedirs(os.path.join(root, "www", "size"))
    for name, size in SIZES.items():
        with open(os.path.join(root, "www", "size", name), "wb") as f:
            f.write(b"x" * size)
    conf = os.path.join(root, "nginx.conf")
    with open(conf, "w") as f:
        f.write(config(root, args.port, args.workers))
    os.execv(nginx, [nginx, "-c", conf, "-p", root])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
