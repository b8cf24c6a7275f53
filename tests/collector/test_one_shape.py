"""One JSON shape: the same traffic, seen by `loupe sensor flows` live and captured by
tcpdump, goes through `replay` (stdout, and `--to` a collector), `tail` and `export`;
every line of all four outputs is read by one parser (jsonfmt.from_dict) and by one jq
script, and they agree on the flow."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sensor import model
from sensor.export import jsonfmt
from tests.kernel.conftest import meter_hooks
from tests.netns import VethPair

LOUPE = str(Path(sys.executable).with_name("loupe"))
JQ = 'select(.type == "flow" and .protocol == 6) | [.community_id, .dst_port, .end]'


def loupe(*args, **kw) -> str:
    out = subprocess.run([LOUPE, *map(str, args)], capture_output=True, text=True,
                         timeout=60, **kw)
    assert out.returncode == 0, (args, out.stderr)
    return out.stdout


def read(text: str) -> list[model.Record]:
    return [jsonfmt.from_dict(json.loads(line)) for line in text.splitlines()]


def jq(text: str) -> list[list]:
    out = subprocess.run(["jq", "-c", JQ], input=text, capture_output=True, text=True,
                         check=True, timeout=30)
    return [json.loads(line) for line in out.stdout.splitlines()]


def _live_traffic(tmp_path: Path) -> tuple[str, Path]:
    """sensor flows' JSON lines and tcpdump's capture of one HTTP request."""
    pcap = tmp_path / "live.pcap"
    with VethPair.create("sh") as pair:
        pair.wait_ready()
        # The server first: sensor flows meters for --duration seconds from its attach,
        # and on a busy machine a server started after it may still be loading by then.
        srv = pair.b.popen(sys.executable, "-m", "http.server", "8080", "--bind",
                           pair.b.ip4, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):   # bounded: 10 s; `ss` sends nothing on the wire
            if pair.b.run("ss", "-Hltn", "sport = :8080").stdout.strip():
                break
            time.sleep(0.1)
        flows = pair.b.popen(LOUPE, "sensor", "flows", "--iface", pair.b.iface, "--format",
                             "json", "--duration", "4", "--linger", "0.2", "--interval", "0.2",
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        dump = pair.b.popen("tcpdump", "-i", pair.b.iface, "-U", "-n", "-w", str(pcap),
                            "tcp port 8080", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
        try:
            assert "listening on" in dump.stderr.readline()
            # Until the program is attached (it compiles first: tens of seconds on a busy
            # machine); bounded: 90 s. Its --duration counts from the attach.
            for _ in range(900):
                if meter_hooks(pair.b.netns, pair.b.iface) or flows.poll() is not None:
                    break
                time.sleep(0.1)
            assert meter_hooks(pair.b.netns, pair.b.iface), "sensor flows never attached"
            pair.a.run("curl", "-s", "-o", "/dev/null", "--max-time", "5",
                       f"http://{pair.b.ip4}:8080/")   # one connection only
            out, err = flows.communicate(timeout=30)
            assert flows.returncode == 0, err
        finally:
            srv.terminate()
            srv.wait()
            for proc in (flows, dump):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
                    proc.wait(10)
    return out, pcap


@pytest.mark.bpf
def test_tail_replay_export_and_sensor_flows_share_one_shape(collector, tmp_path):
    live, pcap = _live_traffic(tmp_path)
    replayed = loupe("replay", pcap, "--sensor-id", "one")
    # --to is the old spelling of --collector: both must keep working.
    loupe("replay", pcap, "--to", collector.address, "--sensor-id", "one")
    tailed = loupe("tail", "--collector", collector.address, "--first", "100", "--format", "json")
    target = tmp_path / "all.jsonl"
    loupe("export", "--collector", collector.address, "-o", target)   # every kind, one file
    exported = target.read_text()

    outputs = {"sensor flows": live, "replay": replayed, "tail": tailed, "export": exported}
    parsed = {name: read(text) for name, text in outputs.items()}
    http_flows = {name: [r for r in recs if isinstance(r, model.Flow) and r.dst_port == 8080]
                  for name, recs in parsed.items()}
    for name, found in http_flows.items():
        assert len(found) == 1, (name, found)
    cid = http_flows["sensor flows"][0].community_id
    assert all(found[0].community_id == cid for found in http_flows.values())
    # The same jq script reads every output, and finds the same flow.
    for name, text in outputs.items():
        assert [row[:2] for row in jq(text)] == [[cid, 8080]], name
    # Through the collector nothing changes (tail and export come in time order, replay
    # in the order records completed).
    def same(recs):
        return sorted(json.dumps(jsonfmt.to_dict(r), sort_keys=True) for r in recs)
    assert same(parsed["tail"]) == same(parsed["replay"])
    assert same(parsed["export"]) == same(parsed["replay"])
    assert [r.detail.status for r in parsed["replay"] if model.record_kind(r) == "http"] == [200]
