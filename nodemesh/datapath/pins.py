"""One node's pins on bpffs: maps under `<bpffs>/<node>/`, links under `<bpffs>/<node>/links/`.

Pins make the datapath outlive the agent, and a new agent adopts what it finds:

- **maps** (`reconcile_maps`, `restore_migrated`): a pinned map whose shape a new build changed
  can not be reused (libbpf would refuse the load), so it is unpinned and recreated: with its
  entries copied when only its size or flags changed, converted where `MIGRATIONS` says how,
  else empty until the agent's next sync refills it;
- **links** (`adopt_link`, `adopt_existing`): a link whose program is the same build is kept,
  one with another build is switched to the new program with an atomic link update, so live
  connections never see a gap; a link whose target is gone or different is replaced.

Also the bpf filesystem itself: `mount_bpffs`, `unmount`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from nodemesh.datapath import libbpf
from nodemesh.datapath.build import DatapathError
from nodemesh.datapath.layout import MAPS

log = logging.getLogger(__name__)


def _l7_redir_any_client(key: bytes, value: bytes) -> tuple[bytes, bytes]:
    """nm_l7_redir before per-client redirects ({addr, port, protocol, pad}: every client was
    redirected) -> the same entry for identity 0 (any client)."""
    return key + bytes(4), value


# Maps whose entries survive a shape change: map -> (old key size, old value size, convert an
# old entry's bytes to the new shape's). Without a migration a recreated map is empty until the
# agent's next sync; for nm_l7_redir that would let clients past the L7 rules in between (they
# would connect straight to pods whose REDIRECT verdicts admit them), so its old entries are
# carried over as identity 0, which keeps the from_container bypass drop in force (fail-closed)
# until the agent has written nm_netns and its per-identity entries.
MIGRATIONS: dict[str, tuple[int, int, Callable[[bytes, bytes], tuple[bytes, bytes]]]] = {
    "nm_l7_redir": (8, 8, _l7_redir_any_client),
}


class LinkState(NamedTuple):
    name: str  # pin name under links/
    link_id: int
    prog_id: int


def mount_bpffs(path: str | Path) -> None:
    """Mount a private bpf filesystem at path (created if needed); no-op if one is there."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if libbpf.is_bpffs(path):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", os.fsencode(path), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise DatapathError(f"mount bpffs at {path}: {os.strerror(err)}")


def unmount(path: str | Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(path), 0) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # not mounted
            raise DatapathError(f"umount {path}: {os.strerror(err)}")


def _fingerprint(prog_fd: int) -> tuple[bytes, frozenset[int], bytes]:
    """What makes two loaded programs the same build: the instruction tag (the kernel
    computes it with map references zeroed), the shared maps they use, and the contents of
    their .rodata (per-load internal maps, compared by value)."""
    tag = bytes(libbpf.prog_info(prog_fd).tag)
    shared: set[int] = set()
    rodata = b""
    for map_id in libbpf.prog_map_ids(prog_fd):
        fd = libbpf.map_fd_by_id(map_id)
        try:
            info = libbpf.map_info(fd)
            if info.name.endswith(b".rodata"):
                rodata += libbpf.map_lookup_raw(fd, bytes(4), info.value_size) or b""
            elif b"." in info.name:
                continue  # .bss/.data would be per-load state; we have none
            else:
                shared.add(map_id)
        finally:
            os.close(fd)
    return tag, frozenset(shared), rodata


def same_build(prog_id: int, new_prog_fd: int) -> bool:
    """Whether the loaded program `prog_id` is the same build as the program `new_prog_fd`."""
    try:
        old_fd = libbpf.prog_fd_by_id(prog_id)
    except libbpf.BpfError:
        return False
    try:
        return _fingerprint(old_fd) == _fingerprint(new_prog_fd)
    finally:
        os.close(old_fd)


def _layout(name: str) -> tuple[int, int]:
    """(key size, value size) this build gives map `name` (0, 0 when unknown here)."""
    types = MAPS.get(name)
    if types is None or types[1] is None:
        return 0, 0
    return ctypes.sizeof(types[0]), ctypes.sizeof(types[1])


class Pins:
    """The pins of one node: `pin_dir` (maps) and `links_dir` (links)."""

    def __init__(self, node: str, bpffs_dir: str | Path) -> None:
        self.node = node
        self.bpffs_dir = Path(bpffs_dir)
        self.pin_dir = self.bpffs_dir / node
        self.links_dir = self.pin_dir / "links"
        self._migrated: dict[str, list[tuple[bytes, bytes]]] = {}

    def require_bpffs(self) -> None:
        if not libbpf.is_bpffs(self.bpffs_dir):
            raise DatapathError(f"{self.bpffs_dir} is not a bpf filesystem: mount one "
                                f"(mount -t bpf bpf {self.bpffs_dir})")

    # -- maps ---------------------------------------------------------------------------------
    def reconcile_maps(self, obj: libbpf.BpfObject) -> None:
        """A pinned map whose shape differs from the object's (a new build changed a struct,
        or another --maglev-table-size) can not be reused: libbpf would refuse the load.
        Unpin it so a new one is created; the old programs keep the old map until their links
        are switched to the new programs."""
        for m in obj.maps():
            if m.internal:
                continue
            pin = self.pin_dir / m.name
            if not pin.exists():
                continue
            fd = libbpf.obj_get(pin)
            try:
                info = libbpf.map_info(fd)
            finally:
                os.close(fd)
            want = (m.type, m.key_size, m.value_size, m.max_entries, m.map_flags)
            have = (info.type, info.key_size, info.value_size, info.max_entries, info.map_flags)
            if want != have:
                carried = self._read_for_migration(m.name, pin, info, m.type)
                resized = want[:3] + want[4:] == have[:3] + have[4:]
                if resized:  # cluster.json's "maps" (`up --map-size`) gives it another size
                    log.warning("map %s resized %d -> %d (cluster.json maps): recreating it%s",
                                pin, info.max_entries, m.max_entries,
                                " empty" if carried is None else
                                f" with its {len(carried)} entries copied")
                    if carried is not None:
                        self._migrated[m.name] = carried
                elif carried is None:
                    log.warning("map %s changed shape %s -> %s: recreating it empty (the "
                                "agent's next sync refills the maps it writes)", pin, have, want)
                else:
                    log.warning("map %s changed shape %s -> %s: recreating it with its %d "
                                "entries converted", pin, have, want, len(carried))
                    self._migrated[m.name] = carried
                libbpf.unpin(pin)

    def _read_for_migration(self, name: str, pin: Path, info: libbpf.MapInfo,
                            new_type: int) -> list[tuple[bytes, bytes]] | None:
        """The entries of a pinned map of an older shape, converted to the new one (MIGRATIONS),
        or copied as they are when only its size or flags changed (same type, same key and
        value layout); None when there is no way to carry them over."""
        migration = MIGRATIONS.get(name)
        same_layout = (info.type == new_type and info.type not in libbpf.PERCPU_MAP_TYPES
                       and info.type != libbpf.BPF_MAP_TYPE_RINGBUF
                       and (info.key_size, info.value_size) == _layout(name))
        if migration is None and same_layout:
            migration = (info.key_size, info.value_size, lambda k, v: (k, v))
        if migration is None or (info.key_size, info.value_size) != migration[:2]:
            return None
        key_t = ctypes.c_uint8 * info.key_size
        value_t = ctypes.c_uint8 * info.value_size
        old = libbpf.Map.from_pin(pin, key_t, value_t)
        try:
            return [migration[2](bytes(k), bytes(v)) for k, v in old.items()]
        finally:
            old.close()

    def restore_migrated(self) -> None:
        """Write the converted entries into the maps that the last load created (before any
        link is switched to the new programs, which use the new maps)."""
        for name in list(self._migrated):
            pin = self.pin_dir / name
            if not pin.exists():
                continue
            entries = self._migrated.pop(name)
            fd = libbpf.obj_get(pin)
            try:
                info = libbpf.map_info(fd)
            finally:
                os.close(fd)
            new = libbpf.Map.from_pin(pin, ctypes.c_uint8 * info.key_size,
                                      ctypes.c_uint8 * info.value_size)
            kept = 0
            try:
                for k, v in entries:
                    try:
                        new.put((ctypes.c_uint8 * len(k)).from_buffer_copy(k),
                                (ctypes.c_uint8 * len(v)).from_buffer_copy(v))
                    except libbpf.BpfError as e:
                        if e.errno not in (errno.E2BIG, errno.ENOSPC):  # hash, LPM trie
                            raise
                        # a smaller map (another --map-size): what fits is carried over, the
                        # agent's next sync decides what it holds (and reports what not)
                        log.warning("map %s is smaller now (%d entries): %d of its %d old "
                                    "entries carried over", pin, info.max_entries, kept,
                                    len(entries))
                        break
                    kept += 1
            finally:
                new.close()

    def forget_migrated(self) -> None:
        """Drop entries read for a migration that will not happen (the load failed)."""
        self._migrated.clear()

    # -- links --------------------------------------------------------------------------------
    def adopt_link(self, pin_name: str, prog: libbpf.Program,
                   target_ok: Callable[[libbpf.LinkInfo], bool],
                   create: Callable[[], libbpf.Link]) -> str:
        """Keep, update or (re)create the link pinned at links/<pin_name>; says which."""
        pin = self.links_dir / pin_name
        if pin.exists():
            try:
                with libbpf.Link.from_pin(pin) as link:
                    info = link.info()
                    if target_ok(info):
                        if same_build(info.prog_id, prog.fd):
                            return "kept"
                        link.update_program(prog.fd)
                        return "updated"
                    # another cgroup, a deleted device: this pin describes something else
                    with contextlib.suppress(libbpf.BpfError):
                        link.detach()
            except libbpf.BpfError as e:
                log.warning("%s: replacing unusable link pin %s: %s", self.node, pin, e)
            libbpf.unpin(pin)
        with create() as link:
            link.pin(pin)
        return "created"

    def adopt_existing(self, pins: list[Path], program_for: Callable[[Path], libbpf.Program],
                       tcx_only: bool = False) -> None:
        """Switch the links pinned at `pins` (of earlier agents) to this build's programs
        (`program_for(pin)`); a tcx link whose device is gone is defunct and unpinned, and so
        is a pin that can not be used. With tcx_only every pin is a tcx link."""
        for pin in pins:
            prog = program_for(pin)
            try:
                with libbpf.Link.from_pin(pin) as link:
                    info = link.info()
                    if ((tcx_only or info.type == libbpf.BPF_LINK_TYPE_TCX)
                            and info.tcx_ifindex == 0):
                        libbpf.unpin(pin)  # the device is gone: the link is defunct
                    elif not same_build(info.prog_id, prog.fd):
                        link.update_program(prog.fd)
                        log.info("%s: %s switched to the new program", self.node, pin.name)
            except libbpf.BpfError as e:
                log.warning("%s: dropping unusable link pin %s: %s", self.node, pin, e)
                libbpf.unpin(pin)

    def detach(self, pin_name: str) -> None:
        """Detach and unpin links/<pin_name> (its target may already be gone)."""
        pin = self.links_dir / pin_name
        if not pin.exists():
            return
        try:
            with libbpf.Link.from_pin(pin) as link:
                link.detach()
        except libbpf.BpfError as e:
            if e.errno not in (errno.ENOLINK, errno.EINVAL, errno.ENOENT):
                raise
        libbpf.unpin(pin)

    def links(self) -> list[LinkState]:
        """Every pinned link of this node with its kernel ids."""
        out: list[LinkState] = []
        if not self.links_dir.is_dir():
            return out
        for pin in sorted(self.links_dir.iterdir()):
            try:
                with libbpf.Link.from_pin(pin) as link:
                    info = link.info()
                    out.append(LinkState(pin.name, info.id, info.prog_id))
            except libbpf.BpfError:
                continue
        return out

    def destroy(self) -> None:
        """Detach and unpin every link and map of this node, leaving nothing behind."""
        if self.links_dir.is_dir():
            for pin in self.links_dir.iterdir():
                try:
                    with libbpf.Link.from_pin(pin) as link:
                        link.detach()
                except libbpf.BpfError:
                    pass  # defunct already; unpinning frees it
                libbpf.unpin(pin)
            self.links_dir.rmdir()
        if self.pin_dir.is_dir():
            for pin in self.pin_dir.iterdir():
                libbpf.unpin(pin)
            self.pin_dir.rmdir()
