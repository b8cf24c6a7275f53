"""Go's crypto/tls in a Go binary: where the uprobes of bpf/tls_probe.c go.

A Go program links crypto/tls into its own executable, so each binary (each inode) is
probed on its own: (*Conn).Read and (*Conn).Write at their entry and at every RET
instruction, and (*Conn).Close at its entry (the Conn's address may be reused after).
No uretprobes: a uretprobe replaces the return address on the stack, and Go copies a
goroutine's stack to grow it, taking the replaced address along (the kernel then finds
a return it did not expect and the process gets SIGSEGV).

The RETs are found by disassembling each function (capstone) from its symbol's start to
its end (st_size): Go puts no data in .text, so a linear sweep decodes every instruction,
and a sweep that stops before the end is refused rather than guessed. A byte scan for
0xC3 is not enough: the byte occurs inside other instructions (two of ten in Go 1.19's
Write).

Symbols come from .symtab; `go build -ldflags=-s` (or strip) removes it, and then from
.gopclntab, the table the Go runtime itself reads for tracebacks, which no strip removes.
Its layout is the Go 1.18+ one (magic 0xFFFFFFF0, 1.18-1.19; 0xFFFFFFF1, 1.20+): a
header (function count, text start, offsets of the name table and the function table),
then per function its entry (offset from the text start) and its _func record, whose
second field is the name's offset. A function ends where the next one starts (the
padding between them is INT3, which decodes). Older tables (Go 1.17's 0xFFFFFFFA) are a
one-line warning.

Only amd64 is handled (the register ABI's registers are named in tls_probe.c).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import struct

from sensor.kernel.elfsyms import ElfError, function_ranges, sections, segments

READ = "crypto/tls.(*Conn).Read"
WRITE = "crypto/tls.(*Conn).Write"
CLOSE = "crypto/tls.(*Conn).Close"
# A function larger than this is not Go 1.17-1.23's Read or Write (1-2 KiB): refused.
MAX_FUNCTION = 64 << 10
# .gopclntab is read whole when a binary has no .symtab: bounded (a 1 GiB binary's is
# ~100 MiB).
MAX_PCLNTAB = 256 << 20
# The stack check is within the first instructions of a function (LEA, CMP, JBE).
PROLOGUE = 4
# pclntab magics with the 1.18+ header layout.
_PCLN_MAGICS = (0xFFFFFFF0, 0xFFFFFFF1)


class GoTlsError(Exception):
    """A Go binary that uses crypto/tls but cannot be probed (the text says why)."""


@dataclass(frozen=True, slots=True)
class Function:
    offset: int                 # file offset of the entry
    returns: tuple[int, ...]    # file offsets of its RET instructions
    body: int                   # file offset of the first instruction past the stack check


@dataclass(frozen=True, slots=True)
class GoTls:
    read: Function
    write: Function
    close: int | None           # file offset of Close's entry


def is_go(path: str | Path) -> bool:
    """An ELF file the Go toolchain built (its build info or pclntab section)."""
    try:
        names = sections(path)
    except (OSError, ElfError):
        return False
    return ".go.buildinfo" in names or ".gopclntab" in names


def find(path: str | Path) -> GoTls | None:
    """The probe points of a Go binary; None when it does not use crypto/tls's Conn."""
    if os.uname().machine != "x86_64":
        raise GoTlsError(f"Go binaries are probed on x86_64 only, not {os.uname().machine}")
    try:
        ranges = function_ranges(path, {READ, WRITE, CLOSE})
    except (OSError, ElfError) as exc:
        raise GoTlsError(f"cannot read its symbols ({exc})") from None
    if READ not in ranges or WRITE not in ranges:
        ranges = _pclntab_ranges(path, {READ, WRITE, CLOSE})
        if READ not in ranges or WRITE not in ranges:
            return None
    with open(path, "rb") as f:
        read = _function(f, *ranges[READ])
        write = _function(f, *ranges[WRITE])
    close = ranges[CLOSE][0] if CLOSE in ranges else None
    return GoTls(read=read, write=write, close=close)


def _function(f, offset: int, size: int) -> Function:
    try:
        import capstone  # noqa: PLC0415 (only Go binaries need a disassembler)
    except ImportError:
        raise GoTlsError("the capstone package is not installed (pip install capstone): "
                         "the return points of Go's crypto/tls cannot be found") from None
    if not 0 < size <= MAX_FUNCTION:
        raise GoTlsError(f"implausible size {size} of a crypto/tls function")
    f.seek(offset)
    code = f.read(size)
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    end = 0
    returns = []
    body = None
    check = False
    for n, (address, length, mnemonic, operands) in enumerate(md.disasm_lite(code, 0)):
        if mnemonic == "ret":
            returns.append(offset + address)
        if n < PROLOGUE and body is None:
            # The stack check: CMP of RSP (or RSP - frame) with g.stackguard0 (R14 + 16),
            # then a conditional jump to the morestack call, which grows the stack and
            # jumps back to the entry.
            if mnemonic == "cmp" and "[r14 + 0x10]" in operands:
                check = True
            elif check and mnemonic in ("jbe", "jb"):
                body = offset + address + length
        end = address + length
    # Go pads a function to its alignment with INT3 (0xCC), which decodes; a sweep that
    # stops early met something that is not code: no guessing where the RETs are.
    if end != len(code) or not returns:
        raise GoTlsError(f"disassembling crypto/tls at {offset:#x} stopped at {end} of "
                         f"{len(code)} octets; its plaintext is not seen")
    if body is None:
        raise GoTlsError(f"crypto/tls at {offset:#x} does not start with Go's stack check; "
                         "its plaintext is not seen")
    return Function(offset=offset, returns=tuple(returns), body=body)


def _pclntab_ranges(path: str | Path, names: set[str]) -> dict[str, tuple[int, int]]:
    """{name: (file offset, size)} from .gopclntab (Go 1.18+ layout; module text)."""
    try:
        secs = sections(path)
        loads = segments(path)
    except (OSError, ElfError) as exc:
        raise GoTlsError(f"cannot read its sections ({exc})") from None
    where = secs.get(".gopclntab")
    if where is None or where[1] > MAX_PCLNTAB:
        return {}
    with open(path, "rb") as f:
        f.seek(where[0])
        tab = f.read(where[1])
    wanted = {n.encode() + b"\0" for n in names}
    if not any(w in tab for w in wanted):
        return {}   # a Go program that does not use crypto/tls's Conn
    if len(tab) < 72 or struct.unpack_from("<I", tab, 0)[0] not in _PCLN_MAGICS \
            or tab[7] != 8:
        raise GoTlsError("a Go binary without a symbol table whose .gopclntab is not of the "
                         "Go 1.18+ layout: its crypto/tls plaintext is not seen")
    nfunc, _, text, names_off, _, _, _, funcs_off = struct.unpack_from("<8Q", tab, 8)
    if funcs_off + 8 * (nfunc + 1) > len(tab):
        raise GoTlsError(".gopclntab's function table runs past the section")
    out: dict[str, tuple[int, int]] = {}
    for i in range(nfunc):
        entry, func = struct.unpack_from("<II", tab, funcs_off + 8 * i)
        at = funcs_off + func + 4
        if at + 4 > len(tab):
            continue
        name_at = names_off + struct.unpack_from("<i", tab, at)[0]
        end = tab.find(b"\0", name_at)
        name = tab[name_at:end + 1]
        if name not in wanted:
            continue
        size = struct.unpack_from("<I", tab, funcs_off + 8 * (i + 1))[0] - entry
        vaddr = text + entry
        for base, length, offset in loads:
            if base <= vaddr < base + length:
                out[name[:-1].decode()] = (vaddr - base + offset, size)
                break
    return out
