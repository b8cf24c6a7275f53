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
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.export.ipfix_decode import REVERSE_PEN, Decoder, addr, num

REPO = Path(__file__).resolve().parents[2]
GOLDEN = sorted(str(p) for p in (REPO / "tests" / "golden").glob("*.pcap"))
# `python -m` from the repository: this tree's code, whatever the venv points at.
LOUPE = [sys.executable, "-m", "sensor.cli"]
ICMP = {1, 58}

needs = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("nfcapd", "nfdump", "nfacctd")),
    reason="nfdump and pmacct are not installed (scripts/apt-packages.txt)")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def wait_for(path: Path, text: str, deadline_s: float = 10.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {path} after {deadline_s} s")


def key(src: str, dst: str, sport: int, dport: int, proto: int) -> tuple:
    # ICMP has no ports: nfdump puts type/code where the destination port goes.
    return (src, dst, proto) if proto in ICMP else (src, dst, sport, dport, proto)


@needs
def test_nfcapd_and_nfdump_show_the_same_biflows(tmp_path):
    port = free_udp_port()
    store = tmp_path / "nfcapd"
    store.mkdir()
    log = tmp_path / "nfcapd.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["nfcapd", "-w", str(store), "-p", str(port),
                                 "-b", "127.0.0.1"], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(log, "Startup")
        flows = replay(f"127.0.0.1:{port}", tmp_path / "flows.jsonl")
        time.sleep(0.3)          # the last datagrams are read before the stop
    finally:
        proc.send_signal(signal.SIGTERM)   # nfcapd writes its file out at stop
        proc.wait(10)
    text = log.read_text()
    # nfcapd checks the sequence numbers of every message per observation domain.
    assert "Sequence Errors: 0" in text, text
    (capture,) = store.glob("nfcapd.2*")
    shown = subprocess.run(["nfdump", "-r", str(capture), "-o", "json"], capture_output=True,
                           text=True, timeout=30, env={**os.environ, "TZ": "UTC"})
    assert shown.returncode == 0, shown.stderr
    records = json.loads(shown.stdout)

    def ms(stamp: str) -> int:
        from datetime import datetime, timezone
        t = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=timezone.utc)
        return int(t.timestamp() * 1000 + 0.5)

    theirs = Counter(
        (key(r.get("src4_addr") or r["src6_addr"], r.get("dst4_addr") or r["dst6_addr"],
             r.get("src_port", 0), r.get("dst_port", 0), r["proto"]),
         ms(r["first"]), ms(r["last"]), r["in_packets"], r["in_bytes"], r["out_packets"],
         r["out_bytes"], r["src_vlan"])
        for r in records)
    ours = Counter(
        (key(f["src_addr"], f["dst_addr"], f["src_port"], f["dst_port"], f["protocol"]),
         f["flow_start_ns"] // 1_000_000, f["flow_end_ns"] // 1_000_000,
         f["initiator_packets"], f["initiator_octets"], f["responder_packets"],
         f["responder_octets"], f["vlan_id"])
        for f in flows)
    assert theirs == ours
    assert any(f["vlan_id"] for f in flows) and any(f["ip_version"] == 6 for f in flows)


def nfacctd_counts(tmp_path: Path, flows_file: Path, *extra: str) -> tuple[list, Counter]:
    """Our flows, and nfacctd's (src, dst, sport, dport, proto) -> [packets, bytes]."""
    port = free_udp_port()
    out = tmp_path / "nfacctd.json"
    log = tmp_path / "nfacctd.log"
    conf = tmp_path / "nfacctd.conf"
    conf.write_text(f"""daemonize: false
nfacctd_ip: 127.0.0.1
nfacctd_port: {port}
logfile: {log}
plugins: print[p]
aggregate[p]: src_host, dst_host, src_port, dst_port, proto
print_output[p]: json
print_output_file[p]: {out}
print_output_file_append[p]: true
print_refresh_time[p]: 1
""")
    # Its own process group: nfacctd forks a plugin process, and neither ends promptly
    # on SIGTERM or SIGINT, so the group is killed once the output has been read.
    proc = subprocess.Popen(["nfacctd", "-f", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(log, "waiting for NetFlow/IPFIX data")
        flows = replay(f"127.0.0.1:{port}", flows_file, *extra)
        # The print plugin writes its cache out every second; wait for our packets.
        want = sum(f["initiator_packets"] for f in flows)
        if "--ipfix-uniflow" in extra:
            want += sum(f["responder_packets"] for f in flows)
        end = time.monotonic() + 15
        while True:
            got = Counter()
            lines = out.read_text().splitlines() if out.exists() else []
            for r in map(json.loads, lines):
                proto = r["ip_proto"]
                proto = int(proto) if str(proto).isdigit() else socket.getprotobyname(proto)
                k = (r["ip_src"], r["ip_dst"], r["port_src"], r["port_dst"], proto)
                got[k + ("packets",)] += r["packets"]
                got[k + ("bytes",)] += r["bytes"]
            if sum(v for k, v in got.items() if k[-1] == "packets") >= want \
                    or time.monotonic() > end:
                break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    return flows, got


def direction(counter: Counter, k: tuple, packets: int, octets: int) -> None:
    counter[k + ("packets",)] += packets
    counter[k + ("bytes",)] += octets


@needs
def test_nfacctd_counts_both_directions_of_uniflows(tmp_path):
    flows, theirs = nfacctd_counts(tmp_path, tmp_path / "flows.jsonl", "--ipfix-uniflow")
    ours = Counter()
    for f in flows:
        five = (f["src_addr"], f["dst_addr"], f["src_port"], f["dst_port"], f["protocol"])
        direction(ours, five, f["initiator_packets"], f["initiator_octets"])
        if f["responder_packets"]:
            back = (f["dst_addr"], f["src_addr"], f["dst_port"], f["src_port"], f["protocol"])
            direction(ours, back, f["responder_packets"], f["responder_octets"])
    assert +theirs == +ours


@needs
def test_nfacctd_reads_the_initiator_direction_of_biflows(tmp_path):
    # pmacct 1.7.7 skips the RFC 5103 reverse IEs: the responder's half is not counted
    # (hence --ipfix-uniflow for pmacct, docs/export.md).
    flows, theirs = nfacctd_counts(tmp_path, tmp_path / "flows.jsonl")
    ours = Counter()
    for f in flows:
        five = (f["src_addr"], f["dst_addr"], f["src_port"], f["dst_port"], f["protocol"])
        direction(ours, five, f["initiator_packets"], f["initiator_octets"])
    assert +theirs == +ours


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
