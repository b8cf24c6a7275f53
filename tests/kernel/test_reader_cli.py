"""The reader's records over time (interim records at the active timeout), the one-line
errors users see, and `loupe sensor flows` as users run it: a subprocess attached to a
veth in a namespace, printing JSON lines that match the traffic."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw, raw

from sensor.clock import SystemClock
from sensor.errors import KernelError
from sensor.flow.semantics import NS, Timeouts
from sensor.kernel import loader, testrun
from sensor.kernel.events import EventDecoder
from sensor.kernel.flowmap import FlowMapReader
from sensor.model import FlowEndReason
from tests.kernel.conftest import meter_hooks
from tests.netns import VethPair

pytestmark = pytest.mark.bpf

MAC = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
A4, B4 = "198.18.5.1", "198.18.5.2"
LOUPE = str(Path(sys.executable).with_name("loupe"))


def _run(prog, pkt):
    assert testrun.run_skb(prog.prog_fd, raw(Ether(**MAC) / pkt)).retval == -1


def test_interim_records_at_the_active_timeout(load_program):
    prog = load_program(flow_map_size=64)
    active = NS // 5
    reader = FlowMapReader(prog.flows_fd, SystemClock(), timeouts=Timeouts(active_ns=active))
    decoder = EventDecoder()
    prog.open_events(lambda ev: reader.on_event(decoder.decode(ev)))
    udp = IP(src=A4, dst=B4) / UDP(sport=1111, dport=2222) / Raw(b"u" * 10)

    def c2s(flags):
        return IP(src=A4, dst=B4) / TCP(sport=3333, dport=80, flags=flags)

    def s2c(flags):
        return IP(src=B4, dst=A4) / TCP(sport=80, dport=3333, flags=flags)

    for _ in range(3):
        _run(prog, udp)
    _run(prog, c2s("S"))
    _run(prog, s2c("SA"))
    assert reader.collect() == []          # not yet due
    time.sleep(active / NS + 0.05)
    first = {r.protocol: r for r in reader.collect()}
    assert first[17].flow_end_reason == FlowEndReason.ACTIVE_TIMEOUT
    assert (first[17].initiator_packets, first[17].initiator_octets) == (3, 3 * 38)
    assert (first[6].tcp_syn_count, first[6].tcp_fin_count, first[6].conn_state) == (2, 0, "S1")

    for _ in range(2):
        _run(prog, udp)
    _run(prog, c2s("FA"))
    _run(prog, s2c("FA"))
    time.sleep(active / NS + 0.05)
    prog.poll_events(0)
    second = {r.protocol: r for r in reader.collect()}
    assert second[17].uid == first[17].uid and second[17].initiator_packets == 2
    # counts since the previous record; flags and state are the flow's so far
    assert (second[6].tcp_syn_count, second[6].tcp_fin_count) == (0, 2)
    assert second[6].conn_state == "SF" and second[6].initiator_tcp_flags == 0x13
    assert second[6].uid == first[6].uid

    _run(prog, udp)
    reader.drain()
    final = reader.flush()
    # UDP: the last packet, FORCED_END. TCP: nothing new since its interim record, so
    # no final record (as replay's flow table does).
    assert [(r.protocol, r.initiator_packets, r.flow_end_reason) for r in final] == \
        [(17, 1, FlowEndReason.FORCED_END)]
    assert final[0].uid == first[17].uid
    assert reader.stats.empty_final == 1


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr   # no traceback
    assert lines[0].startswith("loupe: error: ")
    return lines[0]


def test_no_such_interface_is_one_line():
    proc = subprocess.run([LOUPE, "sensor", "flows", "--iface", "loupe-nosuch0"],
                          capture_output=True, text=True, timeout=60)
    assert "no network interface named 'loupe-nosuch0'" in _one_line_error(proc)



def test_interface_without_ethernet_header_is_refused():
    """A tun device hands TC bare IP packets; the meter parses Ethernet frames, so it
    refuses the interface in one line instead of counting garbage."""
    from sensor.errors import InterfaceError
    from sensor.kernel import attach
    from tests.kernel.conftest import in_netns

    ns = "loupe-l3test"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "tuntap", "add", "mode", "tun", "name", "ltun0"],
                       check=True)
        proc = subprocess.run(["ip", "netns", "exec", ns, LOUPE, "sensor", "flows", "--iface",
                               "ltun0"], capture_output=True, text=True, timeout=60)
        line = _one_line_error(proc)
        assert "'ltun0' has no Ethernet header (link type 65534, none: tun" in line
        assert "underlay" in line
        with in_netns(ns), pytest.raises(InterfaceError):
            attach.attach("ltun0", -1)   # refused before any program is touched
        with in_netns(ns):
            assert attach.meterable_interface("lo") == attach.interface_index("lo")
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)

def test_not_root_is_one_line():
    # nobody, no capabilities at all (effective, inheritable, bounding)
    proc = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534",
                           "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--",
                           LOUPE, "sensor", "flows", "--iface", "lo"],
                          capture_output=True, text=True, timeout=60)
    line = _one_line_error(proc)
    assert "needs root, or CAP_BPF" in line and "sudo" in line


def test_missing_headers_say_what_to_install(tmp_path):
    with pytest.raises(KernelError) as err:
        loader.check_headers(tmp_path)   # a modules dir without this kernel's headers
    text = str(err.value)
    assert str(tmp_path) in text and "linux-headers-" in text and "\n" not in text



def test_kernel_feature_probes_find_what_this_kernel_has():
    # The probes behind the "upgrade to Linux 5.8 / 5.14" messages: a probe that failed
    # on a kernel that has the feature would refuse every start.
    from sensor.kernel import bpfsys

    assert bpfsys.ringbuf_supported()
    assert bpfsys.hash_lookup_and_delete_supported()
    loader.check_flow_meter_kernel()

def test_idle_timeout_below_the_guard_is_refused():
    proc = subprocess.run([LOUPE, "sensor", "flows", "--iface", "lo", "--idle-timeout", "0.2"],
                          capture_output=True, text=True, timeout=60)
    assert "--idle-timeout must be at least" in _one_line_error(proc)


def test_sensor_flows_prints_json_lines_matching_the_traffic():
    with VethPair.create("kc") as pair:
        pair.wait_ready()
        cli = pair.b.popen(LOUPE, "sensor", "flows", "--iface", pair.b.iface, "--output",
                           "json", "--duration", "4", "--linger", "0.2", "--interval", "0.2",
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            for _ in range(300):   # attached once the meter shows up (bounded: 30 s; compiling takes several under load)
                if meter_hooks(pair.b.netns, pair.b.iface):
                    break
                time.sleep(0.1)
            else:
                raise AssertionError("loupe sensor flows did not attach")
            srv = pair.b.popen(sys.executable, "-m", "http.server", "8080", "--bind",
                               pair.b.ip4, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                for _ in range(50):
                    if pair.a.run("curl", "-s", "-o", "/dev/null", "--max-time", "2",
                                  f"http://{pair.b.ip4}:8080/", check=False).returncode == 0:
                        break
                    time.sleep(0.1)
            finally:
                srv.terminate()
                srv.wait()
            pair.a.run("ping", "-c", "3", "-i", "0.05", pair.b.ip4)
            out, err = cli.communicate(timeout=30)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
    assert cli.returncode == 0, err
    assert "kernel counters:" in err
    records = [r for r in map(json.loads, out.splitlines()) if r["type"] == "flow"]
    http = [r for r in records if r["protocol"] == 6 and r["dst_port"] == 8080
            and r["conn_state"] == "SF"]
    assert len(http) == 1
    assert http[0]["src_addr"] == pair.a.ip4 and http[0]["flow_end_reason"] == 3
    assert http[0]["initiator_packets"] >= 4 and http[0]["responder_octets"] > 200
    [ping] = [r for r in records if r["protocol"] == 1 and r["icmp_type"] == 8]
    assert (ping["initiator_packets"], ping["responder_packets"]) == (3, 3)
    assert ping["conn_state"] == "SF" and ping["community_id"].startswith("1:")
