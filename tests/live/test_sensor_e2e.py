"""`loupe sensor run` end to end: real clients and servers in two namespaces, the sensor
attached to the client's veth, a real collector (DuckDB) on 127.0.0.1, tcpdump on the
same interface as the reference.

- records at the collector are exactly the records the sensor printed; every flow's
  per-direction counters equal tcpdump's; L7 fields equal what the clients sent and got
  (curl keep-alive against an HTTP/1.1 server, openssl s_client against s_server with SNI
  and ALPN, dig over UDP and TCP against dnsmasq), JA4 equal to the one computed from
  the captured ClientHello;
- SIGHUP changes the selection for new flows without dropping a flow; SIGTERM exports
  every live flow as FORCED_END and leaves no TC filter behind.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess

import dpkt
import pytest

from sensor.l7 import fingerprints as fp
from sensor.l7.tls import parse_client_hello
from sensor.model import Flow, FlowEndReason, L7Event
from tests.export.collector_proc import query, wait_for
from tests.kernel.pcapflows import flows_from_pcap, flows_from_records
from tests.kernel.test_netns_counts import Capture
from tests.conftest import REPO
from tests.live.rig import LOUPE, Sensor, meter_hooks, start_http, stop, wait_closed, wait_tcp
from tests.netns import VethPair

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(240)]

SNI = "tls.live.test"
FLOW_COLS = ("uid", "src_addr", "dst_addr", "src_port", "dst_port", "protocol", "ip_version",
             "vlan_id", "inner_vlan_id", "icmp_type", "icmp_code", "initiator_packets",
             "responder_packets", "initiator_octets", "responder_octets",
             "initiator_l2_octets", "responder_l2_octets", "initiator_tcp_flags",
             "responder_tcp_flags", "flow_end_reason", "app_proto", "http_host", "dns_qname",
             "tls_sni", "tls_ja4")


@pytest.fixture
def pair():
    with VethPair.create("lv") as p:
        p.set_offloads(False)   # tcpdump then sees wire packets, as the kernel counts them
        p.wait_ready()
        yield p


def _sensor_args(pair, collector, tmp_path, *extra) -> list[str]:
    return ["--netns", pair.a.netns, "--iface", pair.a.iface,
            "--collector", collector.address, "--spool-dir", str(tmp_path / "spool"),
            "--sensor-id", "livetest", "--output", "jsonl", "--interval", "0.5",
            "--set", "timeouts.tcp_linger=1s", "--set", "export.batch_delay=100ms", *extra]


def _tls_peer(pair, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "30", "-subj", f"/CN={SNI}"], check=True, capture_output=True,
                   timeout=30)
    return pair.b.popen("openssl", "s_server", "-accept", "443", "-cert", str(cert), "-key",
                        str(key), "-alpn", "h2,http/1.1", "-www",
                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)


def _dns_peer(pair):
    return pair.b.popen(
        "dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--bind-interfaces",
        f"--listen-address={pair.b.ip4}", "--port=53", "--pid-file=",
        "--address=/a.live.test/198.18.0.53", f"--conf-file={os.devnull}",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _client_hello_ja4(pcap) -> str:
    for _ts, buf in dpkt.pcap.Reader(open(pcap, "rb")):
        ip = dpkt.ethernet.Ethernet(buf).data
        tcp = getattr(ip, "data", None)
        if isinstance(tcp, dpkt.tcp.TCP) and tcp.dport == 443 and tcp.data[:1] == b"\x16":
            record = bytes(tcp.data)
            assert record[5] == 1          # handshake type ClientHello
            length = int.from_bytes(record[6:9], "big")
            return fp.ja4(parse_client_hello(record[9:9 + length]))
    raise AssertionError("no ClientHello in the capture")


def _tcp_payload(pcap, port: int) -> int:
    total = 0
    for _ts, buf in dpkt.pcap.Reader(open(pcap, "rb")):
        tcp = getattr(dpkt.ethernet.Ethernet(buf).data, "data", None)
        if isinstance(tcp, dpkt.tcp.TCP) and port in (tcp.sport, tcp.dport):
            total += len(tcp.data)
    return total


def _rows(address: str, table: str, cols) -> list[dict]:
    rows = query(address, f"SELECT {', '.join(cols)} FROM {table} ORDER BY 1")
    return [dict(zip(cols, r)) for r in rows]


def test_records_at_the_collector_are_exact(pair, collector, tmp_path):
    http = start_http(pair.b, tmp_path)
    tls = _tls_peer(pair, tmp_path)
    dns = _dns_peer(pair)
    sensor = Sensor(_sensor_args(pair, collector, tmp_path,
                                 "--select", "port:8080,port:443,port:53"), workdir=tmp_path)
    try:
        for port in (8080, 443, 53):
            wait_tcp(pair.a, pair.b.ip4, port)
            wait_closed(port, pair.a, pair.b)   # the probe's flow is over
        sensor.start()
        cap = Capture(pair.a, tmp_path / "cap.pcap")
        sizes = [100, 2000, 0, 20000, 5]
        urls = [f"http://{pair.b.ip4}:8080/size/{n}" for n in sizes] + \
            [f"http://{pair.b.ip4}:8080/missing"]
        out = pair.a.run("curl", "-s", "-A", "live-curl", *[a for u in urls
                                                             for a in ("-o", "/dev/null", u)],
                         "-w", "%{num_connects} ")
        assert out.stdout.split() == ["1", "0", "0", "0", "0", "0"]   # one connection
        pair.a.run("bash", "-c", f"openssl s_client -connect {pair.b.ip4}:443 "
                   f"-servername {SNI} -alpn h2,http/1.1 -tls1_2 </dev/null")
        pair.a.run("dig", f"@{pair.b.ip4}", "+tries=1", "+time=2", "a.live.test", "A")
        pair.a.run("dig", f"@{pair.b.ip4}", "+tries=1", "+time=2", "+tcp", "a.live.test", "A")
        pair.a.run("ping", "-c", "2", "-i", "0.1", pair.b.ip4)
        pair.a.run("ping", "-6", "-c", "2", "-i", "0.1", pair.b.ip6)
        # Past the 1 s linger and a read: the TCP flows (HTTP, TLS, DNS) have ended and
        # are printed; the UDP and ICMP ones end at the stop.
        sensor.wait_records(lambda rs: {r.dst_port for r in rs if isinstance(r, Flow)
                                        and r.protocol == 6} >= {8080, 443, 53}, 30,
                            "the ended TCP flows")
        err = cap.stop()
        assert "0 packets dropped by kernel" in err, err
        assert sensor.stop() == 0
    finally:
        sensor.kill()
        for p in (http, tls, dns):
            stop(p)
    records = sensor.records()
    flows = [r for r in records if isinstance(r, Flow)]
    events = [r for r in records if isinstance(r, L7Event)]

    # Flow counters equal the capture's, flow by flow (TCP, UDP and the pings; ICMPv6
    # neighbour discovery may have begun before the capture).
    reference = {k: v for k, v in flows_from_pcap(cap.path).items()
                 if k[2] in (6, 17) or (k[2] in (1, 58) and k[4] in (8, 128))}
    mine = flows_from_records([f for f in flows if f.protocol in (6, 17)
                               or f.icmp_type in (8, 128)])
    assert set(mine) == set(reference)
    for key, ref in reference.items():
        assert mine[key].sides == ref.sides, key
        assert mine[key].initiator == ref.initiator, key

    # HTTP: every request of the keep-alive connection, as curl sent and got it.
    [web] = [f for f in flows if f.dst_port == 8080]
    assert (web.app_proto, web.http_host) == ("http", f"{pair.b.ip4}:8080")
    assert web.flow_end_reason == FlowEndReason.END_OF_FLOW and web.src_addr == pair.a.ip4
    assert web.process is not None and web.process.comm == "curl"
    https = [e for e in events if e.kind == "http"]
    assert [(e.detail.method, e.detail.path, e.detail.status, e.detail.response_body_len)
            for e in https] == [("GET", f"/size/{n}", 200, n) for n in sizes] + \
        [("GET", "/missing", 404, https[-1].detail.response_body_len)]
    assert all(e.uid == web.uid and e.detail.user_agent == "live-curl"
               and e.community_id == web.community_id for e in https)
    # Every payload octet of the flow is accounted once: copied, truncated by the
    # budget, skipped on the L7 stage's request (bodies, after the stop) or lost.
    cov = web.l7_coverage
    assert cov.inspected and not cov.sampled
    assert (cov.captured_octets + cov.truncated_octets + cov.skipped_octets
            + cov.gap_octets) == _tcp_payload(cap.path, 8080)

    # TLS 1.2 (so the chosen ALPN is in the clear ServerHello): SNI, ALPN offered and
    # chosen, JA4 as computed from the captured ClientHello.
    [hello] = [e for e in events if e.kind == "tls"]
    [tflow] = [f for f in flows if f.dst_port == 443]
    assert hello.uid == tflow.uid and hello.detail.sni == SNI
    assert hello.detail.alpn == ("h2", "http/1.1") and hello.detail.alpn_selected == "h2"
    assert hello.detail.ja4 == _client_hello_ja4(cap.path) == tflow.tls_ja4
    assert tflow.tls_sni == SNI and tflow.app_proto == "tls"
    tc = tflow.l7_coverage
    assert tc.captured_octets + tc.truncated_octets + tc.skipped_octets + tc.gap_octets \
        == _tcp_payload(cap.path, 443)

    # DNS over UDP and TCP: the query and the answer dnsmasq gave.
    answers = [e for e in events if e.kind == "dns"]
    assert sorted(e.detail.transport for e in answers) == ["tcp", "udp"]
    for e in answers:
        assert (e.detail.qname, e.detail.qtype, e.detail.rcode) == ("a.live.test", 1, 0)
        assert [(a.rtype, a.data) for a in e.detail.answers] == [(1, "198.18.0.53")]
    assert {f.dns_qname for f in flows if f.dst_port == 53} == {"a.live.test"}

    # The collector holds exactly these records: same uids, same counters, once each.
    wait_for(lambda: len(query(collector.address, "SELECT uid FROM flows")) >= len(flows),
             20, "the flows at the collector")
    stored = _rows(collector.address, "flows", FLOW_COLS)
    printed = sorted(({c: getattr(f, c) for c in FLOW_COLS} for f in flows),
                     key=lambda d: d["uid"])
    for d in printed:
        d["flow_end_reason"] = int(d["flow_end_reason"])
    assert stored == printed
    stored_http = _rows(collector.address, "http", ("uid", "method", "path", "status"))
    assert sorted((r["uid"], r["path"]) for r in stored_http) == \
        sorted((e.uid, e.detail.path) for e in https)
    assert len(query(collector.address, "SELECT uid FROM tls")) == 1
    assert len(query(collector.address, "SELECT uid FROM dns")) == 2


def test_reload_changes_selection_and_sigterm_flushes_and_detaches(pair, collector,
                                                                   tmp_path):
    http = start_http(pair.b, tmp_path)
    sensor = Sensor(_sensor_args(pair, collector, tmp_path, "--select", "port:9"),
                    workdir=tmp_path)
    config = tmp_path / "sensor.toml"
    config.write_text("[selection]\nports = [9]\nsniff = false\n")
    sensor.args += ["--config", str(config)]
    sensor.args.remove("--select")
    sensor.args.remove("port:9")
    try:
        wait_tcp(pair.a, pair.b.ip4, 8080)
        wait_closed(8080, pair.a, pair.b)
        sensor.start()
        assert meter_hooks(pair.a) == ["ingress", "egress"]
        # A long connection across the reload: started while 8080 is not selected.
        slow = pair.a.popen("bash", "-c",
                            f"exec 3<>/dev/tcp/{pair.b.ip4}/8080; for i in 1 2 3 4 5 6; do "
                            "printf 'GET /size/10 HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n' >&3; "
                            "sleep 0.5; done; echo sent; sleep 30", stdout=subprocess.PIPE,
                            text=True)
        pair.a.run("curl", "-s", "-o", "/dev/null", f"http://{pair.b.ip4}:8080/size/1")
        config.write_text("[selection]\nports = [8080]\nsniff = false\n")
        sensor.signal(signal.SIGHUP)
        sensor.wait_note("RELOADING=1", 10)
        sensor.wait_note("READY=1", 10)
        pair.a.run("curl", "-s", "-o", "/dev/null", f"http://{pair.b.ip4}:8080/size/2")
        # The long connection's requests all went out, and both curls' flows ended (the
        # 1 s linger) and are printed: exported.
        ready, _, _ = select.select([slow.stdout], [], [], 15)
        assert ready and slow.stdout.readline().strip() == "sent"
        sensor.wait_records(lambda rs: sum(isinstance(r, Flow) and r.dst_port == 8080
                                           for r in rs) >= 2, 30, "the two curls' flows")
        # `loupe status` sees both daemons: the sensor's exports, the collector's store.
        status = subprocess.run(
            [*LOUPE, "status", "--sensor-metrics", f"127.0.0.1:{sensor.metrics_port}",
             "--collector", collector.address, "--interval", "0.2"],
            capture_output=True, text=True, timeout=60, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        assert status.returncode == 0, status.stderr
        assert f"sensor at 127.0.0.1:{sensor.metrics_port}: up" in status.stdout
        assert re.search(r"exported: .*flow \d+", status.stdout), status.stdout
        assert f"collector at {collector.address}: up" in status.stdout
        assert "sensor livetest:" in status.stdout
        assert sensor.stop() == 0
        slow.kill()
        slow.wait(5)
    finally:
        sensor.kill()
        stop(http)
    records = sensor.records()
    flows = [r for r in records if isinstance(r, Flow) and r.dst_port == 8080]
    events = [r for r in records if isinstance(r, L7Event)]
    # Before the reload: a flow, no L7. After: the new flow is inspected.
    assert len(flows) == 3
    by_path = {e.detail.path for e in events}
    assert by_path == {"/size/2"}
    [long] = [f for f in flows if f.flow_end_reason == FlowEndReason.FORCED_END]
    assert not long.l7_coverage.inspected        # it keeps the selection it started with
    assert long.initiator_packets >= 7           # SYN, ACK, 6 requests: nothing dropped
    # SIGTERM: detached, every flow out, the notify sequence complete.
    assert meter_hooks(pair.a) == []
    assert any("STOPPING=1" in n for n in sensor.notes)
    wait_for(lambda: len(query(collector.address,
                               "SELECT uid FROM flows WHERE dst_port = 8080")) == 3,
             20, "the three flows at the collector")
