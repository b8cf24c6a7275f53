"""IPFIX interoperability with the collectors ops run, from Debian: nfdump's nfcapd and
pmacct's nfacctd receive `loupe replay --ipfix` of the golden captures, and show the
same flows, packets and bytes as the replay's own JSON lines of the same run.

How each collector reads a Loupe biflow (RFC 5103):
- nfdump 1.7 reads the reverse IEs (PEN 29305) into its "out" counters: in_packets /
  in_bytes are the initiator's direction, out_packets / out_bytes the responder's.
- pmacct 1.7.7 ignores the reverse IEs, so from a biflow it counts the initiator's
  direction only. With --ipfix-uniflow each direction is a record of its own, and
  nfacctd counts both.
Neither speaks IPFIX over TCP; TCP goes to a receiver here that decodes the stream with
the independent decoder of tests/export/ipfix_decode.py.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.export.ipfix_collectors import (Nfacctd, Nfcapd, biflows, directions,
                                           needs_collectors)
from tests.export.ipfix_decode import REVERSE_PEN, Decoder, addr, num

REPO = Path(__file__).resolve().parents[2]
GOLDEN = sorted(str(p) for p in (REPO / "tests" / "golden").glob("*.pcap"))
# `python -m` from the repository: this tree's code, whatever the venv points at.
LOUPE = [sys.executable, "-m", "sensor.cli"]


def replay(target: str, out: Path, *extra: str) -> list[dict]:
    """`loupe replay GOLDEN... --ipfix target -o out`; the run's own flow records."""
    run = subprocess.run([*LOUPE, "replay", *GOLDEN, "--ipfix", target, "-o", str(out),
                          "--no-progress", *extra], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "IPFIX records sent to" in run.stderr
    flows = [r for r in map(json.loads, out.read_text().splitlines()) if r["type"] == "flow"]
    assert len(flows) >= 10      # the goldens hold TCP, UDP and ICMPv6 flows, v4 and v6
    return flows


@needs_collectors
def test_nfcapd_and_nfdump_show_the_same_biflows(tmp_path):
    nfcapd = Nfcapd(tmp_path)
    try:
        flows = replay(f"127.0.0.1:{nfcapd.port}", tmp_path / "flows.jsonl")
        time.sleep(0.3)          # the last datagrams are read before the stop
    finally:
        nfcapd.stop()            # SIGTERM: nfcapd writes its file out
    # nfcapd checks the sequence numbers of every message per observation domain.
    assert "Sequence Errors: 0" in nfcapd.log(), nfcapd.log()
    # Flow by flow: 5-tuple, start and end (ms), packets and bytes both ways, VLAN.
    assert nfcapd.flows() == biflows(flows)
    assert any(f["vlan_id"] for f in flows) and any(f["ip_version"] == 6 for f in flows)


@needs_collectors
def test_nfacctd_counts_both_directions_of_uniflows(tmp_path):
    nfacctd = Nfacctd(tmp_path)
    try:
        flows = replay(f"127.0.0.1:{nfacctd.port}", tmp_path / "flows.jsonl",
                       "--ipfix-uniflow")
        ours = directions(flows)
        theirs = nfacctd.counts(sum(v for k, v in ours.items() if k[-1] == "packets"))
    finally:
        nfacctd.stop()
    assert +theirs == ours


@needs_collectors
def test_nfacctd_reads_the_initiator_direction_of_biflows(tmp_path):
    # pmacct 1.7.7 skips the RFC 5103 reverse IEs: the responder's half is not counted
    # (hence --ipfix-uniflow for pmacct, docs/export.md).
    nfacctd = Nfacctd(tmp_path)
    try:
        flows = replay(f"127.0.0.1:{nfacctd.port}", tmp_path / "flows.jsonl")
        ours = directions(flows, responder=False)
        theirs = nfacctd.counts(sum(v for k, v in ours.items() if k[-1] == "packets"))
    finally:
        nfacctd.stop()
    assert +theirs == ours


def test_tcp_transport_end_to_end(tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(30)
    stream = bytearray()

    def receive() -> None:
        conn, _ = server.accept()
        with conn:
            while chunk := conn.recv(65536):
                stream.extend(chunk)

    reader = threading.Thread(target=receive)
    reader.start()
    try:
        flows = replay(f"tcp://127.0.0.1:{server.getsockname()[1]}", tmp_path / "f.jsonl")
        reader.join(10)
    finally:
        server.close()
    decoder, pos, seen, expected_seq = Decoder(), 0, [], 0
    while pos < len(stream):
        length = int.from_bytes(stream[pos + 2:pos + 4], "big")
        msg = decoder.message(bytes(stream[pos:pos + length]))
        assert msg.templates == ([256, 257] if pos == 0 else [])   # once per connection
        assert msg.sequence == expected_seq
        expected_seq += len(msg.records)
        seen += msg.records
        pos += length
    ours = sorted((f["src_addr"], f["initiator_packets"], f["initiator_octets"],
                   f["responder_packets"], f["responder_octets"]) for f in flows)
    got = sorted((addr(r, "sourceIPv4Address" if (0, 8) in r else "sourceIPv6Address"),
                  num(r, "packetDeltaCount"), num(r, "octetDeltaCount"),
                  num(r, "packetDeltaCount", REVERSE_PEN),
                  num(r, "octetDeltaCount", REVERSE_PEN)) for r in seen)
    assert got == ours


def test_replay_fails_in_one_line_when_nothing_listens(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]          # closed again: connection refused
    run = subprocess.run([*LOUPE, "replay", GOLDEN[0], "--ipfix", f"tcp://127.0.0.1:{port}"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert run.stdout == ""                # --ipfix alone: no JSON lines on stdout
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("loupe: error: ") and "IPFIX records could not be sent" in last
    assert "Traceback" not in run.stderr
