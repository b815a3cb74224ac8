"""A small typed ctypes binding over the system's `libbpf.so.1` (Debian 12: libbpf 1.1.2).

What the datapath needs and nothing more: open an object with a pin root, resize a map or set a
`.rodata` variable before load, load (a verifier rejection raises `VerifierError` with the
verifier log), find programs and maps, map operations with ctypes keys and values, pinning,
cgroup links (`bpf_program__attach_cgroup`) and tcx links (raw `bpf_link_create`: libbpf 1.1
predates tcx, the kernel does not), link update, ring buffers drained without wakeups, object
info (tags, ids), the network-namespace cookie, `setns` (Python 3.11 has no `os.setns`), and
`prog_test_run` (BPF_PROG_TEST_RUN: run a program on a made-up packet, for tests and costs).

libbpf 1.x returns `-errno` from int functions and NULL + errno from pointer functions; both are
turned into `BpfError` (an `OSError`, so `.errno` works).
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import logging
import os
import platform
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypeVar

log = logging.getLogger(__name__)

_lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
_libc = ctypes.CDLL(None, use_errno=True)

# --- constants (include/uapi/linux/bpf.h) ----------------------------------------------------
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_MAP_TYPE_RINGBUF = 27
PERCPU_MAP_TYPES = frozenset(
    {BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH}
)
BATCH_MAP_TYPES = frozenset(
    {
        BPF_MAP_TYPE_HASH,
        BPF_MAP_TYPE_PERCPU_HASH,
        BPF_MAP_TYPE_LRU_HASH,
        BPF_MAP_TYPE_LRU_PERCPU_HASH,
    }
)

BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_UDP4_SENDMSG = 14
BPF_CGROUP_UDP4_RECVMSG = 19
BPF_CGROUP_INET4_GETPEERNAME = 29
BPF_TCX_INGRESS = 46  # kernel >= 6.6; unknown to libbpf 1.1, passed through by bpf_link_create
BPF_TCX_EGRESS = 47

BPF_SK_LOOKUP = 36  # a network namespace's socket lookup (kernel >= 5.9)
BPF_LINK_TYPE_CGROUP = 3
BPF_LINK_TYPE_NETNS = 5
BPF_LINK_TYPE_TCX = 11

CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71
BPF_FS_MAGIC = 0xCAFE4A11


class BpfError(OSError):
    """A libbpf or bpf() call failed; `.errno` says why."""


class VerifierError(BpfError):
    """The kernel refused to load a program. `.log` holds libbpf's output with the verifier log."""

    def __init__(self, err: int, what: str, log_text: str) -> None:
        tail = "\n".join(log_text.rstrip().splitlines()[-40:])
        super().__init__(err, f"{what}: {os.strerror(err)}\n{tail}")
        self.log = log_text


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise BpfError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


def _check_ptr(ptr: int | None, what: str) -> int:
    if not ptr:
        err = ctypes.get_errno() or errno_mod.EINVAL
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return ptr


def _fn(name: str, restype: Any, *argtypes: Any) -> Any:
    f = getattr(_lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


_vp, _int, _u32, _u64, _size, _str = (
    ctypes.c_void_p,
    ctypes.c_int,
    ctypes.c_uint32,
    ctypes.c_uint64,
    ctypes.c_size_t,
    ctypes.c_char_p,
)


class _OpenOpts(ctypes.Structure):
    """struct bpf_object_open_opts as of libbpf 1.1 (sz says which fields we know)."""

    _fields_ = [
        ("sz", _size),
        ("object_name", _str),
        ("relaxed_maps", ctypes.c_bool),
        ("pin_root_path", _str),
        ("_attach_prog_fd", _u32),
        ("kconfig", _str),
        ("btf_custom_path", _str),
        ("kernel_log_buf", _vp),
        ("kernel_log_size", _size),
        ("kernel_log_level", _u32),
    ]


class _LinkUpdateOpts(ctypes.Structure):
    _fields_ = [("sz", _size), ("flags", _u32), ("old_prog_fd", _u32)]


class _BatchOpts(ctypes.Structure):
    _fields_ = [("sz", _size), ("elem_flags", _u64), ("flags", _u64)]


class _TestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts as of libbpf 1.1."""

    _fields_ = [
        ("sz", _size),
        ("data_in", _vp),
        ("data_out", _vp),
        ("data_size_in", _u32),
        ("data_size_out", _u32),
        ("ctx_in", _vp),
        ("ctx_out", _vp),
        ("ctx_size_in", _u32),
        ("ctx_size_out", _u32),
        ("retval", _u32),
        ("repeat", _int),
        ("duration", _u32),
        ("flags", _u32),
        ("cpu", _u32),
        ("batch_size", _u32),
    ]


_open_file = _fn("bpf_object__open_file", _vp, _str, ctypes.POINTER(_OpenOpts))
_obj_load = _fn("bpf_object__load", _int, _vp)
_obj_close = _fn("bpf_object__close", None, _vp)
_find_prog = _fn("bpf_object__find_program_by_name", _vp, _vp, _str)
_find_map = _fn("bpf_object__find_map_by_name", _vp, _vp, _str)
_next_map = _fn("bpf_object__next_map", _vp, _vp, _vp)
_next_prog = _fn("bpf_object__next_program", _vp, _vp, _vp)
_prog_fd = _fn("bpf_program__fd", _int, _vp)
_prog_name = _fn("bpf_program__name", _str, _vp)
_attach_cgroup = _fn("bpf_program__attach_cgroup", _vp, _vp, _int)
_map_fd = _fn("bpf_map__fd", _int, _vp)
_map_name = _fn("bpf_map__name", _str, _vp)
_map_type = _fn("bpf_map__type", _int, _vp)
_map_key_size = _fn("bpf_map__key_size", _u32, _vp)
_map_value_size = _fn("bpf_map__value_size", _u32, _vp)
_map_max_entries = _fn("bpf_map__max_entries", _u32, _vp)
_map_flags = _fn("bpf_map__map_flags", _u32, _vp)
_map_set_value_size = _fn("bpf_map__set_value_size", _int, _vp, _u32)
_map_set_max_entries = _fn("bpf_map__set_max_entries", _int, _vp, _u32)
_map_initial_value = _fn("bpf_map__initial_value", _vp, _vp, ctypes.POINTER(_size))
_map_is_internal = _fn("bpf_map__is_internal", ctypes.c_bool, _vp)
_map_pin_path = _fn("bpf_map__pin_path", _str, _vp)
_link_fd = _fn("bpf_link__fd", _int, _vp)
_link_disconnect = _fn("bpf_link__disconnect", None, _vp)
_link_destroy = _fn("bpf_link__destroy", _int, _vp)
_link_create = _fn("bpf_link_create", _int, _int, _int, _int, _vp)
_link_update = _fn("bpf_link_update", _int, _int, _int, ctypes.POINTER(_LinkUpdateOpts))
_link_detach = _fn("bpf_link_detach", _int, _int)
_obj_pin = _fn("bpf_obj_pin", _int, _int, _str)
_obj_get = _fn("bpf_obj_get", _int, _str)
_obj_info = _fn("bpf_obj_get_info_by_fd", _int, _int, _vp, ctypes.POINTER(_u32))
_prog_by_id = _fn("bpf_prog_get_fd_by_id", _int, _u32)
_map_by_id = _fn("bpf_map_get_fd_by_id", _int, _u32)
_map_update = _fn("bpf_map_update_elem", _int, _int, _vp, _vp, _u64)
_map_lookup = _fn("bpf_map_lookup_elem", _int, _int, _vp, _vp)
_map_delete = _fn("bpf_map_delete_elem", _int, _int, _vp)
_map_next_key = _fn("bpf_map_get_next_key", _int, _int, _vp, _vp)
_map_lookup_batch = _fn(
    "bpf_map_lookup_batch",
    _int,
    _int,
    _vp,
    _vp,
    _vp,
    _vp,
    ctypes.POINTER(_u32),
    ctypes.POINTER(_BatchOpts),
)
_num_cpus = _fn("libbpf_num_possible_cpus", _int)
_test_run = _fn("bpf_prog_test_run_opts", _int, _int, ctypes.POINTER(_TestRunOpts))

_RB_SAMPLE_FN = ctypes.CFUNCTYPE(_int, _vp, _vp, _size)
_rb_new = _fn("ring_buffer__new", _vp, _int, _RB_SAMPLE_FN, _vp, _vp)
_rb_poll = _fn("ring_buffer__poll", _int, _vp, _int)
_rb_consume = _fn("ring_buffer__consume", _int, _vp)
_rb_free = _fn("ring_buffer__free", None, _vp)
_rb_epoll_fd = _fn("ring_buffer__epoll_fd", _int, _vp)

_libc.setns.argtypes = [_int, _int]
_libc.setns.restype = _int


# --- libbpf's log -----------------------------------------------------------------------------
# libbpf_set_print hands us (level, fmt, va_list). On x86-64 a va_list argument is a pointer to
# the register save area, so it can go straight to vasprintf. The verifier log reaches us this
# way when a load fails: libbpf retries the load with log_level 1 and prints the whole log (up to
# 16 MiB) in one message, whose end holds the error, so nothing may truncate it: vasprintf
# allocates exactly what the message needs.
_PRINT_FN = ctypes.CFUNCTYPE(_int, _int, _str, _vp)
_vasprintf = _libc.vasprintf
_vasprintf.restype = _int
_vasprintf.argtypes = [ctypes.POINTER(_vp), _str, _vp]
_libc.free.argtypes = [_vp]
_libc.free.restype = None
_LIBBPF_WARN, _LIBBPF_INFO, _LIBBPF_DEBUG = 0, 1, 2

_log_local = threading.local()


def _format(fmt: bytes, ap: int) -> str:
    out = _vp()
    n = _vasprintf(ctypes.byref(out), fmt, ap)
    if n < 0 or not out.value:
        return ""
    try:
        return ctypes.string_at(out.value, n).decode(errors="replace")
    finally:
        _libc.free(out)


def _print_cb(level: int, fmt: bytes, ap: int) -> int:
    if level == _LIBBPF_DEBUG:
        return 0  # libbpf's debug chatter: not worth formatting
    msg = _format(fmt, ap)
    capture: list[str] | None = getattr(_log_local, "capture", None)
    if capture is not None:
        capture.append(msg)
    elif level == _LIBBPF_WARN:
        log.warning("libbpf: %s", msg.rstrip())
    else:
        log.debug("libbpf: %s", msg.rstrip())
    return 0


_print_cb_c = _PRINT_FN(_print_cb)  # kept referenced for the life of the process
if platform.machine() in ("x86_64", "AMD64"):
    _fn("libbpf_set_print", _vp, _PRINT_FN)(_print_cb_c)


class _CaptureLog:
    """Collect libbpf's messages of this thread while the block runs."""

    def __enter__(self) -> list[str]:
        self.lines: list[str] = []
        _log_local.capture = self.lines
        return self.lines

    def __exit__(self, *exc: object) -> None:
        _log_local.capture = None


# --- object info ------------------------------------------------------------------------------
class ProgInfo(ctypes.Structure):
    """The head of struct bpf_prog_info (the kernel fills what fits)."""

    _fields_ = [
        ("type", _u32),
        ("id", _u32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", _u32),
        ("xlated_prog_len", _u32),
        ("jited_prog_insns", _u64),
        ("xlated_prog_insns", _u64),
        ("load_time", _u64),
        ("created_by_uid", _u32),
        ("nr_map_ids", _u32),
        ("map_ids", _u64),
        ("name", ctypes.c_char * 16),
    ]


class MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", _u32),
        ("id", _u32),
        ("key_size", _u32),
        ("value_size", _u32),
        ("max_entries", _u32),
        ("map_flags", _u32),
        ("name", ctypes.c_char * 16),
    ]


class LinkInfo(ctypes.Structure):
    """struct bpf_link_info: type, id, prog_id, then a union at offset 16 that we read as the
    cgroup variant (cgroup_id, attach_type) or the tcx variant (ifindex, attach_type)."""

    _fields_ = [
        ("type", _u32),
        ("id", _u32),
        ("prog_id", _u32),
        ("_pad", _u32),
        ("u0", _u64),
        ("u1", _u32),
        ("u2", _u32),
        ("_rest", ctypes.c_uint8 * 32),
    ]

    @property
    def cgroup_id(self) -> int:
        return int(self.u0)

    @property
    def tcx_ifindex(self) -> int:
        return int(self.u0) & 0xFFFFFFFF

    @property
    def tcx_attach_type(self) -> int:
        return int(self.u0) >> 32

    @property
    def netns_ino(self) -> int:
        return int(self.u0) & 0xFFFFFFFF


_SYS_PIDFD_OPEN, _SYS_PIDFD_GETFD = 434, 438


def pidfd_getfd(pid: int, target_fd: int) -> int:
    """A duplicate, in this process, of file descriptor `target_fd` of process `pid`
    (pidfd_getfd(2): root, kernel >= 5.6). The caller closes it."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = libc.syscall(_SYS_PIDFD_OPEN, pid, 0)
    if pidfd < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"pidfd_open({pid}): {os.strerror(err)}")
    try:
        fd = libc.syscall(_SYS_PIDFD_GETFD, pidfd, target_fd, 0)
        if fd < 0:
            err = ctypes.get_errno()
            raise BpfError(err, f"pidfd_getfd({pid}, {target_fd}): {os.strerror(err)}")
        return fd
    finally:
        os.close(pidfd)


def _info(fd: int, info: ctypes.Structure, what: str) -> None:
    n = _u32(ctypes.sizeof(info))
    _check(_obj_info(fd, ctypes.byref(info), ctypes.byref(n)), what)


def prog_info(fd: int) -> ProgInfo:
    info = ProgInfo()
    _info(fd, info, "prog info")
    return info


def prog_map_ids(fd: int) -> list[int]:
    """The ids of the maps a program uses (two calls: count, then the array)."""
    count = prog_info(fd).nr_map_ids
    if not count:
        return []
    ids = (_u32 * count)()
    info = ProgInfo()
    info.nr_map_ids = count
    info.map_ids = ctypes.addressof(ids)
    _info(fd, info, "prog map ids")
    return list(ids[: min(count, info.nr_map_ids)])


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    _info(fd, info, "map info")
    return info


def link_info(fd: int) -> LinkInfo:
    info = LinkInfo()
    _info(fd, info, "link info")
    return info


def prog_fd_by_id(prog_id: int) -> int:
    return _check(_prog_by_id(prog_id), f"prog id {prog_id}")


def map_fd_by_id(map_id: int) -> int:
    return _check(_map_by_id(map_id), f"map id {map_id}")


def map_lookup_raw(fd: int, key: bytes, value_size: int) -> bytes | None:
    """One value as bytes, for maps whose layout the caller does not model (e.g. .rodata)."""
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value_size)
    ret = _map_lookup(fd, kbuf, vbuf)
    if ret == -errno_mod.ENOENT:
        return None
    _check(ret, "lookup")
    return vbuf.raw


def map_update_raw(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    """Write one value given as bytes (a sockmap takes the socket's fd as its value)."""
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value, len(value))
    _check(_map_update(fd, kbuf, vbuf, flags), "update")


def obj_get(path: str | Path) -> int:
    """fd of a pinned object (map, program or link)."""
    return _check(_obj_get(os.fsencode(path)), f"bpf_obj_get {path}")


def obj_pin(fd: int, path: str | Path) -> None:
    _check(_obj_pin(fd, os.fsencode(path)), f"bpf_obj_pin {path}")


def num_possible_cpus() -> int:
    return _check(_num_cpus(), "libbpf_num_possible_cpus")


def is_bpffs(path: str | Path) -> bool:
    """True when path lies on a bpf filesystem (pins work nowhere else)."""

    class _Statfs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_uint8 * 112)]

    st = _Statfs()
    _libc.statfs.argtypes = [_str, ctypes.POINTER(_Statfs)]
    if _libc.statfs(os.fsencode(path), ctypes.byref(st)) != 0:
        return False
    return (st.f_type & 0xFFFFFFFF) == BPF_FS_MAGIC


# --- maps -------------------------------------------------------------------------------------
K = TypeVar("K", bound=ctypes.Structure | ctypes._SimpleCData | ctypes.Array)  # type: ignore[name-defined]
V = TypeVar("V", bound=ctypes.Structure | ctypes._SimpleCData | ctypes.Array)  # type: ignore[name-defined]


class Map(Generic[K, V]):
    """A map by fd, with ctypes key and value types. Per-CPU maps return a list of values, one
    per possible CPU, and accept one value (written to every CPU) or such a list."""

    def __init__(self, fd: int, key_type: type[K], value_type: type[V], name: str = "",
                 owns_fd: bool = False) -> None:
        info = map_info(fd)
        if ctypes.sizeof(key_type) != info.key_size:
            raise BpfError(errno_mod.EINVAL, f"map {name}: key is {info.key_size} bytes, "
                           f"{key_type.__name__} is {ctypes.sizeof(key_type)}")
        if ctypes.sizeof(value_type) != info.value_size:
            raise BpfError(errno_mod.EINVAL, f"map {name}: value is {info.value_size} bytes, "
                           f"{value_type.__name__} is {ctypes.sizeof(value_type)}")
        self.fd = fd
        self.name = name or info.name.decode()
        self.key_type = key_type
        self.value_type = value_type
        self.map_type = info.type
        self.percpu = info.type in PERCPU_MAP_TYPES
        self._owns_fd = owns_fd
        self._ncpu = num_possible_cpus() if self.percpu else 1
        # the kernel lays per-CPU values out 8-byte aligned
        self._slot = (ctypes.sizeof(value_type) + 7) & ~7

    @classmethod
    def from_pin(cls, path: str | Path, key_type: type[K], value_type: type[V]) -> Map[K, V]:
        return cls(obj_get(path), key_type, value_type, Path(path).name, owns_fd=True)

    def close(self) -> None:
        if self._owns_fd and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def _value_buf(self) -> ctypes.Array:
        return (ctypes.c_uint8 * (self._slot * self._ncpu))()

    def _decode(self, buf: ctypes.Array) -> Any:
        if not self.percpu:
            return self.value_type.from_buffer_copy(buf)
        raw = bytes(buf)
        size = ctypes.sizeof(self.value_type)
        return [self.value_type.from_buffer_copy(raw[i * self._slot : i * self._slot + size])
                for i in range(self._ncpu)]

    def get(self, key: K) -> Any:
        """The value, or None when the key is absent."""
        buf = self._value_buf()
        ret = _map_lookup(self.fd, ctypes.byref(key), buf)
        if ret == -errno_mod.ENOENT:
            return None
        _check(ret, f"lookup {self.name}")
        return self._decode(buf)

    def put(self, key: K, value: V | list[V], flags: int = BPF_ANY) -> None:
        if self.percpu:
            values = value if isinstance(value, list) else [value] * self._ncpu
            buf = self._value_buf()
            for i, v in enumerate(values[: self._ncpu]):
                ctypes.memmove(ctypes.addressof(buf) + i * self._slot, ctypes.byref(v),
                               ctypes.sizeof(self.value_type))
            ret = _map_update(self.fd, ctypes.byref(key), buf, flags)
        else:
            ret = _map_update(self.fd, ctypes.byref(key), ctypes.byref(value), flags)  # type: ignore[arg-type]
        _check(ret, f"update {self.name}")

    def delete(self, key: K) -> bool:
        """True when the key was there."""
        ret = _map_delete(self.fd, ctypes.byref(key))
        if ret == -errno_mod.ENOENT:
            return False
        _check(ret, f"delete {self.name}")
        return True

    def keys(self) -> Iterator[K]:
        cur = self.key_type()
        nxt = self.key_type()
        first = True
        while True:
            ret = _map_next_key(self.fd, None if first else ctypes.byref(cur), ctypes.byref(nxt))
            if ret == -errno_mod.ENOENT:
                return
            _check(ret, f"next key {self.name}")
            first = False
            yield self.key_type.from_buffer_copy(nxt)
            ctypes.memmove(ctypes.byref(cur), ctypes.byref(nxt), ctypes.sizeof(self.key_type))

    def items(self) -> Iterator[tuple[K, Any]]:
        """Every (key, value); hash maps are read in batches, others key by key."""
        if self.map_type in BATCH_MAP_TYPES:
            try:
                yield from self._items_batch()
                return
            except BpfError as e:
                if e.errno not in (errno_mod.EINVAL, errno_mod.ENOTSUP, 524):
                    raise
        for k in self.keys():
            v = self.get(k)
            if v is not None:  # deleted between the two calls
                yield k, v

    def _items_batch(self, chunk: int = 256) -> Iterator[tuple[K, Any]]:
        ksize = ctypes.sizeof(self.key_type)
        keys = (ctypes.c_uint8 * (ksize * chunk))()
        vals = (ctypes.c_uint8 * (self._slot * self._ncpu * chunk))()
        in_batch = (ctypes.c_uint8 * max(ksize, 8))()
        out_batch = (ctypes.c_uint8 * max(ksize, 8))()
        opts = _BatchOpts(ctypes.sizeof(_BatchOpts), 0, 0)
        first = True
        while True:
            count = _u32(chunk)
            ret = _map_lookup_batch(self.fd, None if first else in_batch, out_batch, keys, vals,
                                    ctypes.byref(count), ctypes.byref(opts))
            done = ret == -errno_mod.ENOENT
            if ret < 0 and not done:
                _check(ret, f"lookup batch {self.name}")
            raw_k, raw_v = bytes(keys), bytes(vals)
            vstride = self._slot * self._ncpu
            for i in range(count.value):
                k = self.key_type.from_buffer_copy(raw_k[i * ksize : (i + 1) * ksize])
                vb = (ctypes.c_uint8 * vstride).from_buffer_copy(raw_v[i * vstride : (i + 1) * vstride])
                yield k, self._decode(vb)
            if done:
                return
            ctypes.memmove(in_batch, out_batch, len(in_batch))
            first = False

    def clear(self) -> int:
        n = 0
        for k in list(self.keys()):
            n += self.delete(k)
        return n

    def pin(self, path: str | Path) -> None:
        obj_pin(self.fd, path)


# --- programs and objects ---------------------------------------------------------------------
class Program:
    """A loaded program of a BpfObject (the object owns the fd)."""

    def __init__(self, ptr: int, obj_name: str) -> None:
        self._ptr = ptr
        self.name = _prog_name(ptr).decode()
        self.obj_name = obj_name

    @property
    def fd(self) -> int:
        return _check(_prog_fd(self._ptr), f"prog fd {self.name}")

    def info(self) -> ProgInfo:
        return prog_info(self.fd)

    def attach_cgroup(self, cgroup_path: str | Path) -> Link:
        """A cgroup link (multi-attach); lives while an fd or a pin holds it."""
        cg = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            ptr = _check_ptr(_attach_cgroup(self._ptr, cg), f"attach {self.name} to {cgroup_path}")
        finally:
            os.close(cg)
        # Take the fd over from libbpf's struct bpf_link: once disconnected, destroy frees
        # the struct without closing the fd (which would detach the link).
        fd = _link_fd(ptr)
        _link_disconnect(ptr)
        _link_destroy(ptr)
        return Link(fd, f"{self.name}@{cgroup_path}")

    def attach_netns(self, attach_type: int = BPF_SK_LOOKUP) -> Link:
        """A netns link (sk_lookup) on the calling thread's network namespace."""
        ns = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            fd = _check(_link_create(self.fd, ns, attach_type, None),
                        f"netns attach {self.name}")
        finally:
            os.close(ns)
        return Link(fd, f"{self.name}@netns")

    def attach_tcx(self, ifindex: int, ingress: bool) -> Link:
        """A tcx link on ifindex of the calling thread's network namespace."""
        attach = BPF_TCX_INGRESS if ingress else BPF_TCX_EGRESS
        fd = _check(_link_create(self.fd, ifindex, attach, None),
                    f"tcx attach {self.name} to ifindex {ifindex}")
        return Link(fd, f"{self.name}@tcx/{ifindex}/{'ingress' if ingress else 'egress'}")


class MapDef:
    """A map of a BpfObject, before or after load."""

    def __init__(self, ptr: int) -> None:
        self._ptr = ptr
        self.name = _map_name(ptr).decode()

    @property
    def fd(self) -> int:
        return _map_fd(self._ptr)

    @property
    def type(self) -> int:
        return _map_type(self._ptr)

    @property
    def key_size(self) -> int:
        return _map_key_size(self._ptr)

    @property
    def value_size(self) -> int:
        return _map_value_size(self._ptr)

    @property
    def max_entries(self) -> int:
        return _map_max_entries(self._ptr)

    @property
    def map_flags(self) -> int:
        return _map_flags(self._ptr)

    @property
    def internal(self) -> bool:
        return bool(_map_is_internal(self._ptr))

    @property
    def pin_path(self) -> str | None:
        p = _map_pin_path(self._ptr)
        return p.decode() if p else None

    def set_value_size(self, size: int) -> None:
        _check(_map_set_value_size(self._ptr, size), f"set value size of {self.name}")

    def set_max_entries(self, n: int) -> None:
        """The map's size (entries; bytes for a ring buffer), before load."""
        _check(_map_set_max_entries(self._ptr, n), f"set max entries of {self.name} to {n}")

    def initial_value(self) -> ctypes.Array:
        """The writable initial data of a .data/.rodata map (before load)."""
        size = _size(0)
        ptr = _check_ptr(_map_initial_value(self._ptr, ctypes.byref(size)),
                         f"initial value of {self.name}")
        return (ctypes.c_uint8 * size.value).from_address(ptr)


class BpfObject:
    """An ELF object opened with libbpf. Maps declared with LIBBPF_PIN_BY_NAME are pinned under
    (or reused from) pin_root_path at load."""

    def __init__(self, path: str | Path, pin_root_path: str | Path | None = None) -> None:
        self.path = Path(path)
        self.name = self.path.name.split(".")[0]
        self._pin_root = os.fsencode(pin_root_path) if pin_root_path else None
        opts = _OpenOpts()
        opts.sz = ctypes.sizeof(_OpenOpts)
        opts.pin_root_path = self._pin_root
        with _CaptureLog() as lines:
            ptr = _open_file(os.fsencode(self.path), ctypes.byref(opts))
        if not ptr:
            err = ctypes.get_errno() or errno_mod.EINVAL
            raise BpfError(err, f"open {self.path}: {os.strerror(err)}\n{''.join(lines)}")
        self._ptr: int | None = ptr
        self.loaded = False

    def _obj(self) -> int:
        if not self._ptr:
            raise BpfError(errno_mod.EBADF, f"{self.path}: closed")
        return self._ptr

    def maps(self) -> list[MapDef]:
        out = []
        m = _next_map(self._obj(), None)
        while m:
            out.append(MapDef(m))
            m = _next_map(self._obj(), m)
        return out

    def programs(self) -> list[Program]:
        out = []
        p = _next_prog(self._obj(), None)
        while p:
            out.append(Program(p, self.name))
            p = _next_prog(self._obj(), p)
        return out

    def map(self, name: str) -> MapDef:
        return MapDef(_check_ptr(_find_map(self._obj(), name.encode()), f"{self.path}: map {name}"))

    def has_map(self, name: str) -> bool:
        return bool(_find_map(self._obj(), name.encode()))

    def program(self, name: str) -> Program:
        ptr = _check_ptr(_find_prog(self._obj(), name.encode()), f"{self.path}: program {name}")
        return Program(ptr, self.name)

    def has_rodata(self, var: str) -> bool:
        """Whether the object has a `const volatile` global `var` in its .rodata."""
        from nodemesh.datapath.elf import BpfElf, ElfError

        try:
            BpfElf(self.path).variable_offset(".rodata", var)
        except ElfError:
            return False
        return True

    def set_rodata(self, var: str, data: bytes) -> None:
        """Set a `const volatile` global before load (its offset comes from the ELF symbols)."""
        from nodemesh.datapath.elf import BpfElf

        offset, size = BpfElf(self.path).variable_offset(".rodata", var)
        if len(data) != size:
            raise ValueError(f"{var} is {size} bytes, got {len(data)}")
        rodata = next((m for m in self.maps() if m.internal and m.name.endswith(".rodata")), None)
        if rodata is None:
            raise BpfError(errno_mod.ENOENT, f"{self.path}: no .rodata map")
        buf = rodata.initial_value()
        ctypes.memmove(ctypes.addressof(buf) + offset, data, size)

    def load(self) -> None:
        with _CaptureLog() as lines:
            ret = _obj_load(self._obj())
        if ret < 0:
            text = "".join(lines)
            if "verifier" in text.lower() or "processed" in text or "-- BEGIN PROG LOAD LOG --" in text:
                raise VerifierError(-ret, f"load {self.path}", text)
            raise BpfError(-ret, f"load {self.path}: {os.strerror(-ret)}\n{text}")
        self.loaded = True

    def close(self) -> None:
        """Free the object: its fds close, so programs and maps live on only through pins and
        links."""
        if self._ptr:
            _obj_close(self._ptr)
            self._ptr = None

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- test runs ----------------------------------------------------------------------------------
class ProgRun(NamedTuple):
    retval: int
    duration_ns: int  # the kernel's average per repetition
    data: bytes  # the packet afterwards
    ctx: bytes  # the context afterwards (tc: struct __sk_buff, e.g. the mark at offset 8)


def prog_test_run(prog_fd: int, data: bytes, repeat: int = 1, ctx: bytes | None = None,
                  ctx_out_size: int = 256) -> ProgRun:
    """BPF_PROG_TEST_RUN: run a program `repeat` times on `data` in the calling thread's
    network namespace (a tc program's skb->dev is that namespace's loopback, so socket lookups
    search it). `ctx` is the input context (tc: the leading bytes of struct __sk_buff; only
    mark, priority, ifindex, cb, tstamp, wire_len, gso_* may be non-zero)."""
    data_in = ctypes.create_string_buffer(data, len(data))
    data_out = ctypes.create_string_buffer(len(data) + 256)
    ctx_out = ctypes.create_string_buffer(ctx_out_size)
    opts = _TestRunOpts()
    opts.sz = ctypes.sizeof(_TestRunOpts)
    opts.data_in = ctypes.cast(data_in, _vp)
    opts.data_size_in = len(data)
    opts.data_out = ctypes.cast(data_out, _vp)
    opts.data_size_out = len(data_out)
    ctx_in = None
    if ctx is not None:
        ctx_in = ctypes.create_string_buffer(ctx, len(ctx))
        opts.ctx_in = ctypes.cast(ctx_in, _vp)
        opts.ctx_size_in = len(ctx)
        opts.ctx_out = ctypes.cast(ctx_out, _vp)
        opts.ctx_size_out = ctx_out_size
    opts.repeat = repeat
    _check(_test_run(prog_fd, ctypes.byref(opts)), "prog test run")
    return ProgRun(opts.retval, opts.duration, data_out.raw[: opts.data_size_out],
                   ctx_out.raw[: opts.ctx_size_out] if ctx is not None else b"")


# --- links ------------------------------------------------------------------------------------
class Link:
    """A BPF link by fd. Closing the fd detaches it unless it is pinned."""

    def __init__(self, fd: int, desc: str = "") -> None:
        self.fd = fd
        self.desc = desc

    @classmethod
    def from_pin(cls, path: str | Path) -> Link:
        return cls(obj_get(path), str(path))

    def info(self) -> LinkInfo:
        return link_info(self.fd)

    def pin(self, path: str | Path) -> None:
        obj_pin(self.fd, path)

    def update_program(self, prog_fd: int, old_prog_fd: int | None = None) -> None:
        """Atomically swap the program; with old_prog_fd, only if that one is still attached."""
        opts = _LinkUpdateOpts(ctypes.sizeof(_LinkUpdateOpts), 0, 0)
        if old_prog_fd is not None:
            opts.flags = 1 << 2  # BPF_F_REPLACE
            opts.old_prog_fd = old_prog_fd
        _check(_link_update(self.fd, prog_fd, ctypes.byref(opts)), f"update link {self.desc}")

    def detach(self) -> None:
        """Detach now, whoever else holds the link (pins, other fds)."""
        _check(_link_detach(self.fd), f"detach link {self.desc}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unpin(path: str | Path) -> bool:
    """Remove a pin; True when it existed."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


# --- ring buffer ------------------------------------------------------------------------------
R = TypeVar("R", bound=ctypes.Structure)


class RingBuffer(Generic[R]):
    """A BPF ring buffer read with libbpf. The programs submit with BPF_RB_NO_WAKEUP, so epoll
    never fires: call drain() on a timer. callback(record) gets a copy of each record;
    an exception in it is re-raised by drain() after the batch."""

    def __init__(self, map_fd: int, callback: Callable[[R], None], record_type: type[R],
                 raw: bool = False) -> None:
        self._record_type = record_type
        self._size = ctypes.sizeof(record_type)
        self._callback = callback
        self._raw = raw  # hand over the record's bytes: decoding is left to whoever reads it
        self._error: BaseException | None = None

        def sample(_ctx: int, data: int, size: int) -> int:
            try:
                raw = ctypes.string_at(data, min(size, self._size))
                if len(raw) < self._size:
                    raw = raw.ljust(self._size, b"\0")
                self._callback(raw if self._raw else self._record_type.from_buffer_copy(raw))
            except BaseException as e:  # never unwind through C
                if self._error is None:
                    self._error = e
                return -1  # stop this batch; the rest stays in the ring
            return 0

        self._sample = _RB_SAMPLE_FN(sample)  # keep referenced
        self._rb: int | None = _check_ptr(_rb_new(map_fd, self._sample, None, None),
                                          "ring_buffer__new")

    def drain(self) -> int:
        """Consume everything in the ring now; the number of records read."""
        if not self._rb:
            raise BpfError(errno_mod.EBADF, "ring buffer closed")
        n = _rb_consume(self._rb)
        self._raise_pending()
        if n < 0 and n != -errno_mod.EINTR:
            # a callback error ends the batch with its return value
            _check(n, "ring_buffer__consume")
        return max(n, 0)

    def poll(self, timeout_ms: int) -> int:
        """Wait up to timeout_ms for a wakeup (rare: the producers do not wake), then drain."""
        if not self._rb:
            raise BpfError(errno_mod.EBADF, "ring buffer closed")
        _rb_poll(self._rb, timeout_ms)
        self._raise_pending()
        return self.drain()

    def fileno(self) -> int:
        return _rb_epoll_fd(self._rb) if self._rb else -1

    def _raise_pending(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def close(self) -> None:
        if self._rb:
            _rb_free(self._rb)
            self._rb = None

    def __enter__(self) -> RingBuffer[R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- network namespaces -----------------------------------------------------------------------
def setns(path_or_fd: str | Path | int, nstype: int = CLONE_NEWNET) -> None:
    """Move the calling thread into a namespace (a /run/netns/NAME path, /proc/PID/ns/net, or an
    fd). Affects this thread only."""
    if isinstance(path_or_fd, int):
        fd, own = path_or_fd, False
    else:
        fd, own = os.open(path_or_fd, os.O_RDONLY | os.O_CLOEXEC), True
    try:
        if _libc.setns(fd, nstype) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path_or_fd}: {os.strerror(err)}")
    finally:
        if own:
            os.close(fd)


T = TypeVar("T")


def run_in_netns(netns: str | Path, fn: Callable[[], T]) -> T:
    """Run fn in a short-lived thread that entered netns, leaving the caller's thread where it
    is. Netlink, if_nametoindex and tcx attach all resolve names in the thread's namespace."""
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            setns(netns)
            result.append(fn())
        except BaseException as e:
            error.append(e)

    t = threading.Thread(target=body, name=f"netns:{netns}")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def netns_path(name: str) -> str:
    """/run/netns/NAME for a bare name (as `ip netns add` creates), else the path itself."""
    return name if "/" in name else f"/run/netns/{name}"


def netns_cookie(netns: str | Path | None = None) -> int:
    """The kernel's cookie of a network namespace (what bpf_get_netns_cookie() returns)."""

    def get() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        return int.from_bytes(raw, "little")

    return run_in_netns(netns, get) if netns is not None else get()
