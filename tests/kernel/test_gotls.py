"""Where the Go crypto/tls probes go (sensor/kernel/gotls.py), on a client built here with
the distribution's Go: the entry and the RET offsets of (*Conn).Read and Write agree with
binutils' objdump (an independent disassembler); a stripped copy (no .symtab) gives the
same points from .gopclntab; another ELF is not Go. No root needed."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from sensor.kernel import gotls
from sensor.kernel.elfsyms import sections
from tests.live.tls_peers import go_client as build_client


def _objdump_rets(path, vaddr: int, size: int) -> list[int]:
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", f"--start-address={vaddr:#x}",
                          f"--stop-address={vaddr + size:#x}", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return [int(m.group(1), 16) for m in re.finditer(r"^\s*([0-9a-f]+):\s+ret\b", out, re.M)]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    if shutil.which("objdump") is None:
        pytest.skip("objdump is not installed (binutils)")
    return build_client(tmp_path_factory.mktemp("go"))


def test_returns_match_objdump(client):
    found = gotls.find(client)
    text_off, _ = sections(client)[".text"]
    text_vaddr = int(subprocess.run(["objdump", "-h", str(client)], capture_output=True,
                                    text=True, check=True).stdout.split(".text")[1].split()[2],
                     16)
    nm = subprocess.run(["nm", "-S", str(client)], capture_output=True, text=True,
                        check=True).stdout
    for fn, name in ((found.read, gotls.READ), (found.write, gotls.WRITE)):
        line = next(l for l in nm.splitlines() if l.endswith(" " + name))
        vaddr, size = (int(x, 16) for x in line.split()[:2])
        assert fn.offset == vaddr - text_vaddr + text_off
        want = [a - text_vaddr + text_off for a in _objdump_rets(client, vaddr, size)]
        assert want and list(fn.returns) == want
        # Past the stack check: the instruction after the prologue's JBE to morestack.
        lines = subprocess.run(["objdump", "-d", "--no-show-raw-insn",
                                f"--start-address={vaddr:#x}", f"--stop-address={vaddr + 32:#x}",
                                str(client)], capture_output=True, text=True,
                               check=True).stdout
        addrs = re.findall(r"^\s*([0-9a-f]+):\s+(\w+)", lines, re.M)
        after = next(int(addrs[i + 1][0], 16) for i, (_, m) in enumerate(addrs) if m == "jbe")
        assert fn.body == after - text_vaddr + text_off
    assert found.close is not None
    assert gotls.is_go(client)


def test_stripped_binary_from_pclntab(client, tmp_path):
    stripped = tmp_path / "stripped"
    subprocess.run(["objcopy", "--strip-all", str(client), str(stripped)], check=True)
    assert ".symtab" not in sections(stripped) and gotls.is_go(stripped)
    assert gotls.find(stripped) == gotls.find(client)


def test_pclntab_of_another_layout_is_a_reason(client, tmp_path):
    """Go 1.17's table (magic 0xFFFFFFFA) is not read: one line, no guess."""
    stripped = tmp_path / "stripped"
    subprocess.run(["objcopy", "--strip-all", str(client), str(stripped)], check=True)
    data = bytearray(stripped.read_bytes())
    off, _ = sections(stripped)[".gopclntab"]
    data[off:off + 4] = (0xFFFFFFFA).to_bytes(4, "little")
    old = tmp_path / "old"
    old.write_bytes(bytes(data))
    with pytest.raises(gotls.GoTlsError, match="Go 1.18"):
        gotls.find(old)


def test_other_executables():
    assert not gotls.is_go(shutil.which("true"))
    assert not gotls.is_go(__file__)
