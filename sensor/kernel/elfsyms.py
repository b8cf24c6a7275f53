"""File offsets of exported functions in an ELF shared library, for uprobes.

A uprobe is placed at a file offset of an inode. A function's dynamic symbol gives its
virtual address; the PT_LOAD segment that contains it maps that address back to the
file (offset = value - p_vaddr + p_offset). For a library only .dynsym is read: exported
functions are what a program calls through the PLT, and a stripped library keeps it. A
Go binary exports nothing: its functions are in .symtab (`function_ranges`), which
`go build -ldflags=-s` strips. ELF64
little-endian only (the architectures bcc's probes run on here); anything else, or a
damaged file, is an ElfError the caller turns into a one-line warning naming the file.
"""

from __future__ import annotations

import struct
from pathlib import Path

# Bounds a crafted or huge file cannot exceed: section headers and a symbol table of
# this size cover any real library (libcrypto has ~5000 dynamic symbols).
_MAX_SECTIONS = 1 << 16
_MAX_TABLE = 64 << 20

_SHT_SYMTAB = 2
_SHT_DYNSYM = 11
_STT_FUNC = 2
_STT_GNU_IFUNC = 10
_PT_LOAD = 1


class ElfError(Exception):
    """Not an ELF64 little-endian file we can read symbols from."""


def function_offsets(path: str | Path, names: set[str]) -> dict[str, int]:
    """{name: file offset} for the defined functions among `names` that the file exports."""
    return {name: off for name, (off, _) in _functions(path, names, _SHT_DYNSYM).items()}


def function_ranges(path: str | Path, names: set[str]) -> dict[str, tuple[int, int]]:
    """{name: (file offset, size)} for the defined functions among `names` in the file's
    full symbol table (.symtab); {} when it has none (stripped)."""
    return _functions(path, names, _SHT_SYMTAB)


def _functions(path: str | Path, names: set[str], table: int) -> dict[str, tuple[int, int]]:
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF":
            raise ElfError("not an ELF file")
        if head[4] != 2 or head[5] != 1:
            raise ElfError("not a 64-bit little-endian ELF file")
        (phoff, shoff) = struct.unpack_from("<QQ", head, 32)
        (phentsize, phnum, shentsize, shnum) = struct.unpack_from("<HHHH", head, 54)
        if shnum > _MAX_SECTIONS or shentsize < 64 or phentsize < 56:
            raise ElfError("implausible section or program header table")
        f.seek(phoff)
        ph = f.read(phentsize * phnum)
        loads = []
        for i in range(phnum):
            p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
                "<IIQQQQ", ph, i * phentsize)
            if p_type == _PT_LOAD:
                loads.append((p_vaddr, p_filesz, p_offset))
        f.seek(shoff)
        sh = f.read(shentsize * shnum)
        if len(sh) < shentsize * shnum:
            raise ElfError("section header table cut short")
        sections = [struct.unpack_from("<IIQQQQIIQQ", sh, i * shentsize) for i in range(shnum)]
        dynsym = next((s for s in sections if s[1] == table), None)
        if dynsym is None:
            return {}
        strtab = sections[dynsym[6]] if dynsym[6] < shnum else None
        if strtab is None or dynsym[5] > _MAX_TABLE or strtab[5] > _MAX_TABLE:
            raise ElfError("implausible symbol table")
        f.seek(dynsym[4])
        syms = f.read(dynsym[5])
        f.seek(strtab[4])
        strs = f.read(strtab[5])
    wanted = {n.encode(): n for n in names}
    out: dict[str, tuple[int, int]] = {}
    for i in range(0, len(syms) - 23, 24):
        st_name, st_info, _other, st_shndx, st_value, st_size = struct.unpack_from(
            "<IBBHQQ", syms, i)
        if st_shndx == 0 or st_info & 0xF not in (_STT_FUNC, _STT_GNU_IFUNC):
            continue   # undefined (imported) or not a function
        end = strs.find(b"\0", st_name)
        name = wanted.get(strs[st_name:end])
        if name is None or name in out:
            continue
        for vaddr, size, offset in loads:
            if vaddr <= st_value < vaddr + size:
                out[name] = (st_value - vaddr + offset, st_size)
                break
    return out


def sections(path: str | Path) -> dict[str, tuple[int, int]]:
    """{section name: (file offset, size)} of an ELF64 little-endian file."""
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF":
            raise ElfError("not an ELF file")
        if head[4] != 2 or head[5] != 1:
            raise ElfError("not a 64-bit little-endian ELF file")
        shoff = struct.unpack_from("<Q", head, 40)[0]
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", head, 58)
        if shnum > _MAX_SECTIONS or shentsize < 64 or shstrndx >= max(shnum, 1):
            raise ElfError("implausible section header table")
        f.seek(shoff)
        sh = f.read(shentsize * shnum)
        if len(sh) < shentsize * shnum:
            raise ElfError("section header table cut short")
        table = [struct.unpack_from("<IIQQQQIIQQ", sh, i * shentsize) for i in range(shnum)]
        names = table[shstrndx]
        if names[5] > _MAX_TABLE:
            raise ElfError("implausible section name table")
        f.seek(names[4])
        strs = f.read(names[5])
    out = {}
    for sec in table:
        end = strs.find(b"\0", sec[0])
        out[strs[sec[0]:end].decode(errors="replace")] = (sec[4], sec[5])
    return out


def segments(path: str | Path) -> list[tuple[int, int, int]]:
    """(virtual address, file size, file offset) of each PT_LOAD segment."""
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            raise ElfError("not a 64-bit little-endian ELF file")
        phoff = struct.unpack_from("<Q", head, 32)[0]
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        if phentsize < 56:
            raise ElfError("implausible program header table")
        f.seek(phoff)
        ph = f.read(phentsize * phnum)
    out = []
    for i in range(len(ph) // phentsize):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", ph, i * phentsize)
        if p_type == _PT_LOAD:
            out.append((p_vaddr, p_filesz, p_offset))
    return out
