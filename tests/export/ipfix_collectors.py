"""Real IPFIX collectors from Debian for the tests: nfdump's nfcapd (read back with
`nfdump -r -o json`) and pmacct's nfacctd (print plugin, JSON lines), each on a free
loopback UDP port with its own files under the test's directory."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest

ICMP = {1, 58}

needs_collectors = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("nfcapd", "nfdump", "nfacctd")),
    reason="nfdump and pmacct are not installed (scripts/apt-packages.txt)")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _ms(stamp: str) -> int:
    t = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=timezone.utc)
    return round(t.timestamp() * 1000)


class Nfcapd:
    """nfcapd -w DIR -p PORT -b 127.0.0.1; stop() (SIGTERM writes the file out), then
    records() as nfdump shows them, log() for its statistics line."""

    def __init__(self, workdir: Path, *, repeat_to: int = 0) -> None:
        self.dir = workdir / "nfcapd"
        self.dir.mkdir()
        self.port = free_udp_port()
        self.logfile = workdir / "nfcapd.log"
        # -R: nfcapd repeats every datagram it gets there (to feed nfacctd the same run).
        repeat = ["-R", f"127.0.0.1/{repeat_to}"] if repeat_to else []
        with open(self.logfile, "w") as out:
            self.proc = subprocess.Popen(
                ["nfcapd", "-w", str(self.dir), "-p", str(self.port), "-b", "127.0.0.1",
                 *repeat], stdout=out, stderr=subprocess.STDOUT)
        wait_for(self.logfile, "Startup")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)

    def log(self) -> str:
        return self.logfile.read_text()

    def records(self) -> list[dict]:
        # nfcapd starts a new file at every 5-minute wall-clock boundary, so a run that
        # crosses one leaves two files: read them all, oldest first.
        captures = sorted(self.dir.glob("nfcapd.2*"))
        assert captures, f"nfcapd wrote no file in {self.dir}"
        records: list[dict] = []
        for capture in captures:
            shown = subprocess.run(["nfdump", "-r", str(capture), "-o", "json"],
                                   capture_output=True, text=True, timeout=30,
                                   env={**os.environ, "TZ": "UTC"})
            assert shown.returncode == 0, shown.stderr
            records += json.loads(shown.stdout) if shown.stdout.strip() else []
        return records

    def flows(self) -> Counter:
        """(key, first ms, last ms, in packets, in bytes, out packets, out bytes, vlan)."""
        return Counter(
            (key(r.get("src4_addr") or r["src6_addr"], r.get("dst4_addr") or r["dst6_addr"],
                 r.get("src_port", 0), r.get("dst_port", 0), r["proto"]),
             _ms(r["first"]), _ms(r["last"]), r["in_packets"], r["in_bytes"],
             r["out_packets"], r["out_bytes"], r["src_vlan"])
            for r in self.records())

    def uniflows(self) -> Counter:
        """Records of --ipfix-uniflow in the shape of directions()."""
        out: Counter = Counter()
        for r in self.records():
            assert r["out_packets"] == r["out_bytes"] == 0
            k = key(r.get("src4_addr") or r["src6_addr"], r.get("dst4_addr") or r["dst6_addr"],
                    r.get("src_port", 0), r.get("dst_port", 0), r["proto"])
            out[k + ("packets",)] += r["in_packets"]
            out[k + ("bytes",)] += r["in_bytes"]
        return +out


class Nfacctd:
    """nfacctd with a print plugin aggregating by 5-tuple into JSON lines."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_udp_port()
        self.out = workdir / "nfacctd.json"
        log = workdir / "nfacctd.log"
        conf = workdir / "nfacctd.conf"
        conf.write_text(f"""daemonize: false
nfacctd_ip: 127.0.0.1
nfacctd_port: {self.port}
logfile: {log}
plugins: print[p]
aggregate[p]: src_host, dst_host, src_port, dst_port, proto
print_output[p]: json
print_output_file[p]: {self.out}
print_output_file_append[p]: true
print_refresh_time[p]: 1
""")
        # Its own process group: nfacctd forks a plugin process, and neither ends
        # promptly on SIGTERM or SIGINT, so stop() kills the group (the output is read).
        self.proc = subprocess.Popen(["nfacctd", "-f", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(log, "waiting for NetFlow/IPFIX data")

    def counts(self, packets: int, deadline_s: float = 15.0) -> Counter:
        """(src, dst, sport, dport, proto, "packets"|"bytes") -> sum, once `packets`
        packets were written out (the plugin writes its cache every second)."""
        end = time.monotonic() + deadline_s
        while True:
            got: Counter = Counter()
            lines = self.out.read_text().splitlines() if self.out.exists() else []
            for r in map(json.loads, lines):
                proto = r["ip_proto"]
                proto = int(proto) if str(proto).isdigit() else socket.getprotobyname(proto)
                k = key(r["ip_src"], r["ip_dst"], r["port_src"], r["port_dst"], proto)
                got[k + ("packets",)] += r["packets"]
                got[k + ("bytes",)] += r["bytes"]
            seen = sum(v for k, v in got.items() if k[-1] == "packets")
            if seen >= packets or time.monotonic() > end:
                return got
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def directions(flows: list[dict], *, responder: bool = True) -> Counter:
    """Our flows as a pmacct aggregate: each direction's packets and bytes by its
    5-tuple (the responder's direction reversed)."""
    out: Counter = Counter()
    for f in flows:
        five = key(f["src_addr"], f["dst_addr"], f["src_port"], f["dst_port"], f["protocol"])
        out[five + ("packets",)] += f["initiator_packets"]
        out[five + ("bytes",)] += f["initiator_octets"]
        if responder and f["responder_packets"]:
            back = key(f["dst_addr"], f["src_addr"], f["dst_port"], f["src_port"],
                       f["protocol"])
            out[back + ("packets",)] += f["responder_packets"]
            out[back + ("bytes",)] += f["responder_octets"]
    return +out


def biflows(flows: list[dict]) -> Counter:
    """Our flows in the shape of Nfcapd.flows()."""
    return Counter(
        (key(f["src_addr"], f["dst_addr"], f["src_port"], f["dst_port"], f["protocol"]),
         f["flow_start_ns"] // 1_000_000, f["flow_end_ns"] // 1_000_000,
         f["initiator_packets"], f["initiator_octets"], f["responder_packets"],
         f["responder_octets"], f["vlan_id"])
        for f in flows)
