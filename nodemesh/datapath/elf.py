"""Read what nodemesh needs from a compiled BPF object, without libbpf and without root.

Two things: the BTF struct layouts (so the layout test can compare every C struct with its
ctypes twin in `layout.py`), and the ELF symbol table (so the loader can find a `.rodata`
variable's offset and set it before load). Only little-endian ELF64 objects are handled, which
is what `clang -target bpf` produces on x86-64.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BTF_MAGIC = 0xEB9F

# BTF kinds (include/uapi/linux/btf.h)
KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_FWD = 1, 2, 3, 4, 5, 6, 7
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 8, 9, 10, 11
KIND_FUNC, KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_FLOAT = 12, 13, 14, 15, 16
KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 17, 18, 19


class ElfError(ValueError):
    """The file is not an object this module can read."""


@dataclass(frozen=True)
class Section:
    name: str
    type: int
    offset: int
    size: int
    index: int


@dataclass(frozen=True)
class Symbol:
    name: str
    section_index: int
    value: int
    size: int


@dataclass(frozen=True)
class BtfMember:
    name: str
    offset: int  # bytes
    size: int  # bytes of the member's resolved type


@dataclass
class BtfStruct:
    name: str
    size: int
    members: list[BtfMember] = field(default_factory=list)


class BpfElf:
    """An ELF object file held in memory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.data = self.path.read_bytes()
        if self.data[:4] != b"\x7fELF" or self.data[4] != 2 or self.data[5] != 1:
            raise ElfError(f"{self.path}: not a little-endian ELF64 object")
        self.sections = self._read_sections()

    def _read_sections(self) -> dict[str, Section]:
        d = self.data
        (shoff,) = struct.unpack_from("<Q", d, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", d, 0x3A)
        raw = []
        for i in range(shnum):
            name, stype, _flags, _addr, off, size = struct.unpack_from(
                "<IIQQQQ", d, shoff + i * shentsize
            )
            raw.append((name, stype, off, size, i))
        stroff = raw[shstrndx][2]
        out = {}
        for name, stype, off, size, i in raw:
            sname = self._cstr(stroff + name)
            out[sname] = Section(sname, stype, off, size, i)
        return out

    def _cstr(self, off: int) -> str:
        end = self.data.index(b"\0", off)
        return self.data[off:end].decode()

    def section_bytes(self, name: str) -> bytes:
        s = self.sections.get(name)
        if s is None:
            raise ElfError(f"{self.path}: no section {name}")
        return self.data[s.offset : s.offset + s.size]

    def symbols(self) -> list[Symbol]:
        symtab = self.sections.get(".symtab")
        strtab = self.sections.get(".strtab")
        if symtab is None or strtab is None:
            return []
        out = []
        for off in range(symtab.offset, symtab.offset + symtab.size, 24):
            name, _info, _other, shndx, value, size = struct.unpack_from("<IBBHQQ", self.data, off)
            out.append(Symbol(self._cstr(strtab.offset + name), shndx, value, size))
        return out

    def variable_offset(self, section: str, name: str) -> tuple[int, int]:
        """(offset, size) of a global variable inside a data section such as `.rodata`."""
        sec = self.sections.get(section)
        if sec is None:
            raise ElfError(f"{self.path}: no section {section}")
        for sym in self.symbols():
            if sym.name == name and sym.section_index == sec.index:
                return sym.value, sym.size
        raise ElfError(f"{self.path}: no variable {name} in {section}")

    def btf_structs(self) -> dict[str, BtfStruct]:
        """Every named struct in the object's .BTF section, with member byte offsets."""
        return parse_btf_structs(self.section_bytes(".BTF"))

    def btf_map_defs(self) -> dict[str, BtfMapDef]:
        """The maps the object declares, with their types and sizes."""
        return parse_btf_map_defs(self.section_bytes(".BTF"))


@dataclass
class BtfMapDef:
    """A BTF-defined map (a variable of the .maps section) as the C source declared it."""

    name: str
    type: int = 0
    max_entries: int = 0
    map_flags: int = 0
    pinning: int = 0
    key_size: int = 0
    value_size: int = 0
    key_type: str | None = None  # struct name or C scalar name, when declared with __type
    value_type: str | None = None


def parse_btf_structs(btf: bytes) -> dict[str, BtfStruct]:
    return _Btf(btf).structs()


def parse_btf_map_defs(btf: bytes) -> dict[str, BtfMapDef]:
    return _Btf(btf).map_defs()


class _Btf:
    def __init__(self, btf: bytes) -> None:
        self.types, self.name_at = _parse_types(btf)

    def resolve(self, tid: int) -> int:
        """Skip typedef/const/volatile/type tags."""
        for _ in range(32):
            t = self.types[tid]
            if t is None or t[0] not in (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST,
                                          KIND_RESTRICT, KIND_TYPE_TAG):
                return tid
            tid = t[2]
        return tid

    def size_of(self, tid: int) -> int:
        tid = self.resolve(tid)
        t = self.types[tid]
        if t is None:
            return 0
        kind, _name, size_or_type, _vlen, extra = t
        if kind in (KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64, KIND_FLOAT):
            return size_or_type
        if kind == KIND_PTR:
            return 8
        if kind == KIND_ARRAY:
            elem, _idx, nelems = extra  # type: ignore[misc]
            return self.size_of(elem) * nelems
        return 0

    def structs(self) -> dict[str, BtfStruct]:
        out: dict[str, BtfStruct] = {}
        for t in self.types[1:]:
            if t is None:
                continue
            kind, name, size, _vlen, extra = t
            if kind != KIND_STRUCT or not name:
                continue
            st = BtfStruct(name, size)
            for m_name, m_type, bit_off in extra:  # type: ignore[union-attr]
                st.members.append(BtfMember(m_name, bit_off // 8, self.size_of(m_type)))
            out[name] = st
        return out

    def map_defs(self) -> dict[str, BtfMapDef]:
        """libbpf's conventions: __uint(f, N) is `int (*f)[N]`, __type(f, T) is `T *f`."""
        out: dict[str, BtfMapDef] = {}
        for t in self.types[1:]:
            if t is None or t[0] != KIND_DATASEC or t[1] != ".maps":
                continue
            for var_id, _off, _size in t[4]:  # type: ignore[union-attr]
                var = self.types[var_id]
                assert var is not None
                st = self.types[self.resolve(var[2])]
                if st is None or st[0] != KIND_STRUCT:
                    continue
                d = BtfMapDef(var[1])
                for m_name, m_type, _bit in st[4]:  # type: ignore[union-attr]
                    ptr = self.types[self.resolve(m_type)]
                    if ptr is None or ptr[0] != KIND_PTR:
                        continue
                    target = self.resolve(ptr[2])
                    tt = self.types[target]
                    if m_name in ("key", "value"):
                        setattr(d, f"{m_name}_size", self.size_of(target))
                        setattr(d, f"{m_name}_type", tt[1] if tt else None)
                    elif tt is not None and tt[0] == KIND_ARRAY:
                        setattr(d, m_name, tt[4][2])  # type: ignore[index]
                out[d.name] = d
        return out


def _parse_types(btf: bytes) -> tuple[list[Any], Callable[[int], str]]:
    magic, _version, _flags, hdr_len, type_off, type_len, str_off, _str_len = struct.unpack_from(
        "<HBBIIIII", btf, 0
    )
    if magic != BTF_MAGIC:
        raise ElfError("bad BTF magic")
    types_start = hdr_len + type_off
    strings_start = hdr_len + str_off

    def name_at(off: int) -> str:
        end = btf.index(b"\0", strings_start + off)
        return btf[strings_start + off : end].decode()

    # id -> (kind, name, size_or_type, vlen, extra); id 0 is void
    types: list[Any] = [None]
    pos = types_start
    end = types_start + type_len
    while pos < end:
        name_off, info, size_or_type = struct.unpack_from("<III", btf, pos)
        pos += 12
        kind = (info >> 24) & 0x1F
        vlen = info & 0xFFFF
        kind_flag = info >> 31
        extra: object = None
        if kind == KIND_INT:
            pos += 4
        elif kind == KIND_ARRAY:
            extra = struct.unpack_from("<III", btf, pos)  # elem type, index type, nelems
            pos += 12
        elif kind in (KIND_STRUCT, KIND_UNION):
            members = []
            for _ in range(vlen):
                m_name, m_type, m_off = struct.unpack_from("<III", btf, pos)
                pos += 12
                bit_off = m_off & 0xFFFFFF if kind_flag else m_off
                members.append((name_at(m_name), m_type, bit_off))
            extra = members
        elif kind in (KIND_ENUM, KIND_FUNC_PROTO):
            pos += 8 * vlen
        elif kind in (KIND_VAR, KIND_DECL_TAG):
            pos += 4
        elif kind == KIND_DATASEC:
            extra = [struct.unpack_from("<III", btf, pos + 12 * i) for i in range(vlen)]
            pos += 12 * vlen
        elif kind == KIND_ENUM64:
            pos += 12 * vlen
        types.append((kind, name_at(name_off), size_or_type, vlen, extra))
    return types, name_at
