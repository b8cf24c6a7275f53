"""The default selection, as a user meets it: `loupe sensor run` with an empty config file
(every key at the schema's default) sees HTTP, TLS and DNS on ports no rule lists (18080,
18443, 15353), because content sniffing is on by default (issue 11, bug 7: the docs said
so, the code did not)."""

from __future__ import annotations

import os
import subprocess

import pytest

from sensor.config import SelectionConfig
from sensor.model import DnsEvent, HttpEvent, L7Event, TlsEvent
from tests.live.rig import Sensor, start_http, stop, wait_tcp
from tests.netns import VethPair

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(120)]

HTTP, TLS, DNS = 18080, 18443, 15353
SNI = "sniffed.live.test"


def _peers(pair, tmp_path) -> list[subprocess.Popen]:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", f"/CN={SNI}"], check=True, capture_output=True,
                   timeout=30)
    quiet = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [
        start_http(pair.b, tmp_path, HTTP),
        pair.b.popen("openssl", "s_server", "-accept", str(TLS), "-cert", str(cert), "-key",
                     str(key), "-www", **quiet),
        pair.b.popen("dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts",
                     "--bind-interfaces", f"--listen-address={pair.b.ip4}", f"--port={DNS}",
                     "--pid-file=", f"--address=/{SNI}/198.18.0.53",
                     f"--conf-file={os.devnull}", **quiet),
    ]


def test_default_config_sees_l7_on_unlisted_ports(tmp_path):
    assert not {HTTP, TLS, DNS} & set(SelectionConfig().ports)   # only sniffing selects
    empty = tmp_path / "sensor.toml"
    empty.write_text("")
    with VethPair.create("lds") as pair:
        peers = _peers(pair, tmp_path)
        sensor = Sensor(["--config", str(empty), "--netns", pair.a.netns, "--iface",
                         pair.a.iface, "--collector", "", "--output", "jsonl",
                         "--set", "timeouts.tcp_linger=1s"], workdir=tmp_path)
        try:
            wait_tcp(pair.a, pair.b.ip4, HTTP)
            wait_tcp(pair.a, pair.b.ip4, TLS)
            sensor.start()
            for n in range(3):
                pair.a.run("curl", "-s", "-o", "/dev/null", "--max-time", "5",
                           f"http://{pair.b.ip4}:{HTTP}/size/{n + 10}")
            pair.a.run("bash", "-c", f"openssl s_client -connect {pair.b.ip4}:{TLS} "
                       f"-servername {SNI} </dev/null >/dev/null 2>&1", check=False)
            pair.a.run("dig", f"@{pair.b.ip4}", "-p", str(DNS), "+tries=1", "+time=2", SNI, "A",
                       check=False)
        finally:
            code = sensor.stop() if sensor.proc is not None else None
            for peer in peers:
                stop(peer)
    assert code == 0, sensor.stderr
    assert "sniff" in sensor.stderr   # the selection it logged at start
    l7 = [r for r in sensor.records() if isinstance(r, L7Event)]
    http = [r for r in l7 if isinstance(r.detail, HttpEvent)]
    assert sorted(r.detail.path for r in http) == ["/size/10", "/size/11", "/size/12"]
    assert {r.dst_port for r in http} == {HTTP}
    tls = [r for r in l7 if isinstance(r.detail, TlsEvent)]
    assert [(r.dst_port, r.detail.sni) for r in tls] == [(TLS, SNI)]
    dns = [r for r in l7 if isinstance(r.detail, DnsEvent)]
    assert [(r.dst_port, r.detail.qname) for r in dns] == [(DNS, SNI)]
