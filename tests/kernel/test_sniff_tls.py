"""The kernel's content sniffer selects TLS on ports no rule names, on real ClientHellos.

The first client payload of real TLS stacks (OpenSSL's s_client, GnuTLS's gnutls-cli,
Python's ssl) and of the Chrome-shaped post-quantum hello of tests/l7/tls_captures.py
(its first 250-byte write of 300-byte records) is captured on loopback, then put in
front of the real TC program (BPF_PROG_TEST_RUN) on ports 5000 and 2222 with no port
selection: the kernel selects the flow as sniffed and copies the bytes, and userspace's
detection (sensor/l7/detect.py, the registered signatures) calls the same bytes TLS.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from sensor.kernel import abi
from sensor.kernel.hybrid import SelectionConfig
from sensor.l7 import detect
from tests.kernel.test_hybrid import A4, B4, loaded, rig, tcp  # noqa: F401  (fixtures)
from tests.l7 import pcaputil
from tests.l7 import tls_captures as tc

pytestmark = [pytest.mark.bpf,
              pytest.mark.skipif(tc.available() is not None, reason=str(tc.available()))]


def _first_client_payload(pcap: Path, port: int) -> bytes:
    (flow,) = [f for f in pcaputil.flows(pcap) if f.proto == 6 and port in (f.sport, f.dport)]
    return next(c.data for c in flow.chunks if c.direction == 0)


def _python_client(port: int) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="py.x.test"):
            pass


@pytest.fixture(scope="module")
def hellos(tmp_path_factory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("sniff-tls")
    chain = tc.make_chain(tmp, depth=2, sans=2)
    clients = {
        "openssl": lambda port: tc.s_client(port),
        "python-ssl": _python_client,
        "chrome-pq": lambda port: tc.raw_client(
            port, tc.records(tc.chrome_hello("pq.x.test"), 300), segment=250),
    }
    if shutil.which("gnutls-cli"):
        clients["gnutls"] = lambda port: subprocess.run(
            ["gnutls-cli", "--insecure", "--sni-hostname", "g.x.test", "-p", str(port),
             "127.0.0.1"], stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    out = {}
    for name, client in clients.items():
        port = tc.free_port()
        pcap = tmp / f"{name}.pcap"
        with pcaputil.capture_lo(pcap, port):
            with tc.s_server(port, chain):
                client(port)
        out[name] = _first_client_payload(pcap, port)
    return out


@pytest.mark.parametrize("server_port", [5000, 2222])
@pytest.mark.parametrize("client", ["openssl", "python-ssl", "chrome-pq", "gnutls"])
def test_kernel_and_userspace_sniff_real_client_hellos(rig, hellos, client, server_port):
    if client not in hellos:
        pytest.skip("gnutls-cli not installed")
    payload = hellos[client]
    assert detect.detect(protocol=detect.PROTO_TCP, server_port=server_port,
                         to_server=payload) == "tls"
    rig.reset(SelectionConfig(ports=()))
    sport = 8200 + server_port % 100
    rig.run(tcp(A4, B4, sport, server_port, "S", seq=99))
    rig.run(tcp(A4, B4, sport, server_port, "PA", seq=100, data=payload))
    assert rig.flow(sport)[1].l7_select == abi.SEL_SNIFFED
    [ev] = [e for e in rig.events() if e.data]
    assert payload.startswith(ev.data) and ev.seq == 100
    assert ev.direction == abi.PL_TO_RESPONDER
