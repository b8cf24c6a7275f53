"""The compiled per-packet path (sensor/_compiled.py, setup.py) gives the records the pure
Python modules give, byte for byte, and a missing or broken compiled module falls back to
Python with one log line instead of failing.

Each mode runs in its own process (the choice is made at import time): every record of
every capture, as the JSON lines `loupe replay` writes, is compared between the modes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sensor import _compiled

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden"
CORPUS = REPO.parent / "shared" / "corpus"

# The project's golden captures, and corpus captures that reach the paths the golden ones
# do not: IPv6 with HTTP, IPv4 and IPv6 fragments (first-fragment table and
# defragmentation), retransmissions (Zeek history), two VLAN tags, malformed DNS,
# TLS with ALPN, a WAF capture with many HTTP requests.
CORPUS_CAPTURES = (
    "ndpi/http-ipv6-mixed/http_ipv6.pcap",
    "ndpi/dns-fragmented/dns_fragmented.pcap",
    "ndpi/ip-fragmented-garbage/ip_fragmented_garbage.pcap",
    "ndpi/malformed-dns/malformed_dns.pcap",
    "zeek/rxmit-history/wikipedia.pcap",
    "zeek/ipv6-frag-dns/ipv6-fragmented-dns.pcap",
    "zeek/ip-reassembly/reassembly.pcap",
    "arkime/tls-alpn-h2/tls-alpn-h2.pcap",
    "arkime/twovlan/twovlan.pcap",
    "waf/benign.pcap",
)

# Replays each capture on its own (flows do not run across them) and writes its records
# as `loupe replay` writes JSON lines; then prints how each compiled-path module ran.
_RUN = """
import json, sys
from sensor import _compiled
from sensor.replay import replay
from sensor.replay.cli import json_line
out = sys.argv[1]
for i, path in enumerate(sys.argv[2:]):
    with open(f"{out}/{i}.jsonl", "wb") as f:
        for record in replay(path):
            f.write(json_line(record) + b"\\n")
print(json.dumps(_compiled.status()))
"""


def captures() -> list[str]:
    found = sorted(str(p) for p in GOLDEN.rglob("*.pcap*") if not p.name.endswith(".json"))
    found += [str(CORPUS / name) for name in CORPUS_CAPTURES if (CORPUS / name).exists()]
    return found


def run(out: Path, paths: list[str], *, env: dict | None = None,
        pythonpath: Path | None = None) -> tuple[dict, str]:
    out.mkdir()
    environ = {k: v for k, v in os.environ.items() if k != "LOUPE_PURE"}
    environ.update(env or {})
    if pythonpath is not None:
        environ["PYTHONPATH"] = str(pythonpath)
    # `python -c` puts its working directory first on sys.path: run from the copy's.
    done = subprocess.run([sys.executable, "-c", _RUN, str(out), *paths],
                          cwd=pythonpath or REPO,
                          env=environ, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


def outputs(out: Path, count: int) -> list[bytes]:
    return [(out / f"{i}.jsonl").read_bytes() for i in range(count)]


def test_compiled_and_pure_records_are_byte_identical(tmp_path):
    paths = captures()
    assert len(paths) >= 25, paths   # golden and corpus captures were found
    compiled, err = run(tmp_path / "compiled", paths)
    # A module edited since the build runs as Python in both runs (sensor/_compiled.py);
    # the others must be compiled, the meter, flow table and reader at the least.
    not_compiled = {name: how for name, how in compiled.items()
                    if how not in ("compiled", "pure: its .py or .pxd changed since the build")}
    assert not not_compiled, (
        f"the compiled modules did not load ({not_compiled}): build them with `make "
        f"install` or `.venv/bin/pip install -e . --config-settings editable_mode=compat`")
    assert all(compiled.get(name) == "compiled" for name in (
        "sensor.engine.meter", "sensor.engine.flowtable", "sensor.replay.reader")), (
        f"{compiled}: rebuild (make install) after editing them")
    assert "compiled per-packet path" not in err
    pure, err = run(tmp_path / "pure", paths, env={"LOUPE_PURE": "1"})
    assert set(pure.values()) == {"pure: LOUPE_PURE is set"}
    assert "compiled per-packet path" not in err   # asked for: nothing to say
    total = 0
    for path, a, b in zip(paths, outputs(tmp_path / "compiled", len(paths)),
                          outputs(tmp_path / "pure", len(paths))):
        assert a == b, f"{path}: compiled and pure records differ"
        total += a.count(b"\n")
    assert total > 1000   # the captures gave records to compare


@pytest.mark.parametrize("broken", ["absent", "unloadable"])
def test_missing_or_broken_compiled_module_falls_back_with_one_line(tmp_path, broken):
    """A copy of the package whose compiled meter is gone, or is not a shared object:
    one warning line, the meter runs as Python, the records are the pure ones."""
    copy = tmp_path / "pkg"
    shutil.copytree(REPO / "sensor", copy / "sensor",
                    ignore=shutil.ignore_patterns("__pycache__", "*.c"))
    shared = list((copy / "sensor" / "engine").glob("meter.*.so"))
    if broken == "absent":
        for so in shared:
            so.unlink()
    else:
        assert shared, "no compiled meter to break: run `make install` first"
        shared[0].write_bytes(b"not an ELF shared object\n")
    paths = [str(GOLDEN / "http-pipelined.pcap"), str(GOLDEN / "dns-ipv4-fragments-vlan.pcap")]
    status, err = run(tmp_path / "fallback", paths, pythonpath=copy)
    assert status["sensor.engine.meter"].startswith(
        "pure: no compiled module" if broken == "absent" else "pure: failed to load")
    lines = [line for line in err.splitlines() if "compiled per-packet path" in line]
    assert len(lines) == 1 and len(err.splitlines()) == 1, err
    assert "meter" in lines[0] and "\n" not in lines[0]
    pure, _ = run(tmp_path / "pure", paths, env={"LOUPE_PURE": "1"})
    assert outputs(tmp_path / "fallback", 2) == outputs(tmp_path / "pure", 2)


def test_an_edited_source_runs_as_python(tmp_path):
    """A .py changed after the build runs as that .py, not as its stale compiled self."""
    manifest = json.loads((REPO / "sensor" / _compiled.MANIFEST).read_text())
    source = REPO / "sensor" / "engine" / "meter.py"
    assert manifest["modules"]["sensor.engine.meter"] == _compiled.source_sha256(str(source))
    copy = tmp_path / "pkg"
    shutil.copytree(REPO / "sensor", copy / "sensor",
                    ignore=shutil.ignore_patterns("__pycache__", "*.c"))
    edited = copy / "sensor" / "engine" / "meter.py"
    edited.write_text(edited.read_text() + "\nEDITED_AFTER_THE_BUILD = True\n")
    probe = ("import json; import sensor.engine.meter as m; from sensor import _compiled; "
             "print(json.dumps([m.__file__, getattr(m, 'EDITED_AFTER_THE_BUILD', False), "
             "_compiled.status()['sensor.engine.meter']]))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=copy, capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(copy), "LOUPE_PURE": ""})
    assert done.returncode == 0, done.stderr
    where, edited_seen, how = json.loads(done.stdout)
    assert where.endswith("meter.py") and edited_seen
    assert how == "pure: its .py or .pxd changed since the build"
    assert done.stderr == ""   # said at INFO: not a warning on every run


def test_a_pure_flow_table_takes_its_compiled_users_with_it(tmp_path):
    """flowtable.py edited after the build runs as Python; the compiled meter and L7
    engine cimport its types, so their init refuses the pure FlowTable ("size changed").
    They fall back to their .py with one warning line, and the records are the pure ones."""
    copy = tmp_path / "pkg"
    shutil.copytree(REPO / "sensor", copy / "sensor",
                    ignore=shutil.ignore_patterns("__pycache__", "*.c"))
    edited = copy / "sensor" / "engine" / "flowtable.py"
    edited.write_text(edited.read_text() + "\nEDITED_AFTER_THE_BUILD = True\n")
    paths = [str(GOLDEN / "http-pipelined.pcap"), str(GOLDEN / "dns-ipv4-fragments-vlan.pcap")]
    status, err = run(tmp_path / "fallback", paths, pythonpath=copy)
    assert status["sensor.engine.flowtable"] == "pure: its .py or .pxd changed since the build"
    for user in ("sensor.engine.meter", "sensor.engine.l7engine"):
        assert status[user].startswith("pure: failed to load"), status
    assert status["sensor.replay.reader"] == "compiled", status   # no tie to the flow table
    lines = [line for line in err.splitlines() if "compiled per-packet path" in line]
    assert len(lines) == 1 and len(err.splitlines()) == 1, err
    pure, _ = run(tmp_path / "pure", paths, env={"LOUPE_PURE": "1"})
    assert outputs(tmp_path / "fallback", 2) == outputs(tmp_path / "pure", 2)
