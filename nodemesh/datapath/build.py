"""Build the datapath: compile bpf/*.bpf.c into the objects the loader opens.

`Build` knows the source tree (`bpf/`, with its shared headers under `lib/`) and the object
directory (`build/bpf` by default). `ensure_built` recompiles an object when it is missing or
older than its source or any shared header, compiling to a temporary name and renaming, since
another process may be loading the object at that moment.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from nodemesh.errors import NodemeshError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
# load order: bpf_lxc creates the pins, the others reuse them
OBJECTS = ("bpf_lxc", "bpf_sock", "bpf_host", "bpf_netns")
CLANG_FLAGS = ["-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror",
               "-I/usr/include/x86_64-linux-gnu"]


class DatapathError(NodemeshError):
    """The datapath can not be built, loaded or attached; the message says what to do."""


class Build:
    """The BPF sources of one tree and the objects compiled from them."""

    def __init__(self, obj_dir: str | Path = "build/bpf", src_dir: str | Path | None = None) -> None:
        obj = Path(obj_dir)
        self.obj_dir = obj if obj.is_absolute() else REPO_ROOT / obj
        self.src_dir = Path(src_dir) if src_dir else REPO_ROOT / "bpf"

    def sources(self) -> list[Path]:
        return sorted(self.src_dir.glob("*.bpf.c"))

    def objects(self) -> list[str]:
        """The objects this build has: OBJECTS whose source is in the source tree (a build
        from before the tunnel has no bpf_netns; loading it is how an upgrade test runs it)."""
        return [name for name in OBJECTS if (self.src_dir / f"{name}.bpf.c").exists()]

    def object_path(self, name: str) -> Path:
        return self.obj_dir / f"{name}.bpf.o"

    def require_objects(self) -> None:
        """Raise unless every object of this build is compiled."""
        for name in self.objects():
            if not self.object_path(name).exists():
                raise DatapathError(f"{self.object_path(name)} is missing: run `make bpf` or "
                                    "Datapath.ensure_built()")

    def ensure_built(self) -> None:
        """Compile bpf/*.bpf.c when an object is missing or older than its sources/headers."""
        sources = self.sources()
        if not sources:
            raise DatapathError(f"no BPF sources in {self.src_dir}")
        headers = list(self.src_dir.glob("lib/*.h"))
        stale = []
        for src in sources:
            obj = self.obj_dir / src.name.replace(".bpf.c", ".bpf.o")
            newest = max(p.stat().st_mtime for p in [src, *headers])
            if not obj.exists() or obj.stat().st_mtime < newest:
                stale.append((src, obj))
        if not stale:
            return
        clang = shutil.which("clang")
        if clang is None:
            raise DatapathError("clang is not installed: `apt-get install clang llvm libbpf-dev` "
                                "(or `make setup`), then retry")
        self.obj_dir.mkdir(parents=True, exist_ok=True)
        for src, obj in stale:
            # compile to a temporary name and rename: another process may be loading the object
            fd, tmp = tempfile.mkstemp(dir=self.obj_dir, suffix=".o.tmp")
            os.close(fd)
            cmd = [clang, *CLANG_FLAGS, f"-I{self.src_dir}", "-c", str(src), "-o", tmp]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                os.unlink(tmp)
                raise DatapathError(f"compiling {src} failed:\n{res.stderr.strip()}")
            os.replace(tmp, obj)
            log.info("compiled %s", obj)
