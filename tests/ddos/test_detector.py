"""The DDoS detector (sensor/rules/ddos.py) on real event sequences: HTTP/1 connections
through the live L7 stage (tests/ddos/traffic.py), the parsers' incomplete heads, and new
flows as the kernel map reader hands them over. Floods from one source and from many,
slow requests, flow/SYN floods, the learned baseline, episodes and mitigations."""

from __future__ import annotations

import pytest

from sensor.export import wire
from sensor.model import Alert, L7Event
from sensor.rules import ddos
from sensor.rules.ddos_live import incomplete_heads
from tests.ddos.traffic import NS, SERVER, T0, Client, live_l7

FLOODERS = ("198.18.2.1", "198.18.2.2", "198.18.2.3")
POLLERS = ("198.18.1.10", "198.18.1.11")


class Recorder:
    """A ddos.Mitigator that records what it was asked (the kernel side is tested in
    test_kernel_ratelimit.py and live in test_ddos_live.py)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def block(self, source, ttl_ns, note):
        self.calls.append(("block", source, ttl_ns))
        return T0 + ttl_ns

    def limit(self, source, rate, burst, ttl_ns, note):
        self.calls.append(("limit", source, rate, burst, ttl_ns))
        return T0 + ttl_ns


def run(settings: ddos.Settings, *, seconds: int, flood: dict[str, int], start: int = 5,
        stop: int = 12, mitigator=None, status: int = 200):
    """Two pollers at 1 request a second throughout; each flood source at its rate from
    `start` to `stop`. Returns (alerts, detector, events seen)."""
    alerts: list[Alert] = []
    det = ddos.Detector(settings, alerts.append, mitigator=mitigator)
    events = []

    def emit(rec):
        if isinstance(rec, L7Event):
            events.append(rec)
            det.observe(rec)

    l7 = live_l7(emit)
    pollers = [Client(l7, a, 40000 + i) for i, a in enumerate(POLLERS)]
    flooders = {a: Client(l7, a, 41000 + i) for i, a in enumerate(flood)}
    for sec in range(seconds):
        base = T0 + sec * NS
        for i, c in enumerate(pollers):
            c.request(base + (i + 1) * 1_000_000, path="/poll")
        if start <= sec < stop:
            top = max(flood.values(), default=0)
            for k in range(top):
                for addr, rps in flood.items():
                    if k < rps:
                        flooders[addr].request(base + 5_000_000 + k * (900_000_000 // top),
                                               path=f"/search?q={k}", status=status)
        det.tick(base + NS - 1)
    det.tick(T0 + (seconds + 1) * NS)
    return alerts, det, events


def test_flood_from_three_sources_detected_and_only_they_named():
    rec = Recorder()
    s = ddos.Settings(mitigation="block", ttl_ns=30 * NS)
    alerts, det, events = run(s, seconds=16, flood={a: 200 for a in FLOODERS}, mitigator=rec)
    assert len(events) == 16 * 2 + 7 * 600              # every transaction parsed
    [a] = alerts                                         # one episode, one alert
    assert a.rule_id == ddos.RULE_HTTP and a.category == "http-flood"
    # The window's average crosses 50 req/s in the flood's second second.
    assert a.ts_ns - (T0 + 5 * NS) <= 2 * NS
    assert set(a.top_sources.split()) == set(FLOODERS) and a.src_addr in FLOODERS
    assert a.dst_addr == SERVER and a.dst_port == 80
    assert a.action == "block" and a.mitigation == "block" and a.enforced
    assert a.block_expires_ns == T0 + 30 * NS and a.window_ns == 5 * NS and a.baseline == 0
    assert 200 <= a.rate <= 260                           # 3 x 80 req/s after two seconds
    assert sorted(c[1] for c in rec.calls) == sorted(FLOODERS)   # each once, for its TTL
    assert all(c[0] == "block" and c[2] == 30 * NS for c in rec.calls)
    assert wire.from_proto(wire.to_proto(a)) == a
    for p in POLLERS:
        assert all(p not in x.top_sources and x.src_addr != p for x in alerts)
    rates = det.rates()
    assert set(rates) <= {f"{SERVER}:80"}
    # Endpoints: method and path, the query left out (so the flood is one endpoint).
    assert "busiest endpoint GET /search " in a.excerpt
    eps = det.endpoint_rates(f"{SERVER}:80")
    assert set(eps) == {"GET /poll"}, eps      # by the end the flood has left the window


def test_single_source_flood_and_count_mode():
    alerts, _, _ = run(ddos.Settings(), seconds=10, flood={FLOODERS[0]: 300})
    [a] = alerts
    assert a.top_sources == FLOODERS[0] and a.action == "count" and not a.enforced
    assert "1 named" in a.excerpt


def test_flood_from_many_sources_below_the_source_threshold():
    many = {f"198.18.3.{i}": 20 for i in range(1, 31)}        # 30 x 20 req/s = 600 req/s
    s = ddos.Settings(mitigation="ratelimit", rate=7, burst=9, top=10)
    rec = Recorder()
    alerts, _, _ = run(s, seconds=14, flood=many, mitigator=rec)
    assert alerts, "a 600 req/s flood from 30 sources"
    a = alerts[0]
    assert a.rule_id == ddos.RULE_HTTP and len(a.top_sources.split()) == 10
    assert set(a.top_sources.split()) <= set(many)
    assert {c[0] for c in rec.calls} == {"limit"} and all(c[2:4] == (7, 9) for c in rec.calls)
    assert not any(p in x.top_sources for x in alerts for p in POLLERS)


def test_errors_are_counted_and_reported():
    alerts, det, _ = run(ddos.Settings(), seconds=9, flood={FLOODERS[0]: 100}, stop=9,
                         status=503)
    [a] = alerts
    assert "errors" in a.excerpt and "errors 0/s" not in a.excerpt
    # The last window (seconds 5..9) holds the flood's 4 seconds: 400 errors / 5 s.
    assert det.rates()[f"{SERVER}:80"]["errors"] == pytest.approx(80.0)


def test_baseline_learns_then_raises_the_threshold_and_ignores_attacks():
    # 1 s window, learned after 20 windows: the pollers' 2 req/s is the service's normal.
    s = ddos.Settings(window_ns=NS, learn_ns=20 * NS, history_ns=60 * NS, factor=4,
                      service_rps=5, source_rps=1000, source_floor_rps=2)
    # During learning the absolute floor (5 req/s) decides: 6 req/s from one source fires.
    early, _, _ = run(s, seconds=8, flood={FLOODERS[0]: 6}, start=3, stop=5)
    assert early and early[0].baseline == 0 and "learning" in early[0].excerpt
    # Learned (p99 of 2 req/s -> threshold 8): 6 req/s more is not an attack, 12 is.
    quiet, det, _ = run(s, seconds=34, flood={FLOODERS[0]: 4}, start=25, stop=30)
    assert quiet == [] and det.stats.baseline_samples >= 20
    loud, det, _ = run(s, seconds=34, flood={FLOODERS[0]: 10}, start=25, stop=30)
    assert loud and loud[0].baseline == 2 and "baseline p99 2.0" in loud[0].excerpt
    assert loud[0].ts_ns >= T0 + 25 * NS
    # The attack's windows were not learned: the baseline still says 2.
    assert det._req_base[f"{SERVER}:80"].p99() == 2


def test_slowloris_heads_detected_from_the_parsers_state():
    alerts: list[Alert] = []
    det = ddos.Detector(ddos.Settings(mitigation="block", slow_heads=50,
                                      slow_head_ns=5 * NS), alerts.append, mitigator=Recorder())
    l7 = live_l7(lambda rec: None)
    attacker = [Client(l7, "198.18.4.1", 42000 + i) for i in range(60)]
    for i, c in enumerate(attacker):
        c.partial_head(T0 + i * 1_000_000)
    normal = Client(l7, POLLERS[0], 40000)
    normal.request(T0)                       # complete: no pending head
    slow_phone = Client(l7, POLLERS[1], 40001)
    slow_phone.partial_head(T0)              # one slow client: never named
    states = [lf.state for lf in l7._flows.values()]
    heads = incomplete_heads(states, T0 + 3 * NS)
    assert len(heads) == 61 and {h[0] for h in heads} == {"198.18.4.1", POLLERS[1]}
    assert all(h[1:3] == (SERVER, 80) for h in heads)
    det.observe_slow_heads(T0 + 3 * NS, heads)
    assert alerts == []                      # not old enough yet
    det.observe_slow_heads(T0 + 6 * NS, incomplete_heads(states, T0 + 6 * NS))
    [a] = alerts
    assert a.rule_id == ddos.RULE_SLOW and a.category == "slow-request"
    assert a.top_sources == "198.18.4.1" and a.rate == 60 and a.count == 61
    # Finished heads leave the count.
    for c in attacker:
        c._send(0, b"\r\n", 0x18, T0 + 7 * NS)
    assert [h[0] for h in incomplete_heads(states, T0 + 8 * NS)] == [POLLERS[1]]


def test_syn_flood_and_flow_flood_from_new_flows():
    alerts: list[Alert] = []
    det = ddos.Detector(ddos.Settings(flows_ps=100), alerts.append)
    for sec in range(12):
        ts = T0 + sec * NS
        flows = [("198.18.1.10", SERVER, 443, False)]
        if 3 <= sec < 9:
            flows += [(a, SERVER, 443, True) for a in FLOODERS for _ in range(150)]
        det.observe_new_flows(ts, flows)
    det.tick(T0 + 13 * NS)
    [a] = alerts
    assert a.rule_id == ddos.RULE_FLOWS and a.category == "syn-flood"
    assert set(a.top_sources.split()) == set(FLOODERS) and a.dst_port == 443
    assert a.ts_ns - (T0 + 3 * NS) <= 2 * NS
    # Completed handshakes at that rate: a flow flood, not a SYN flood.
    alerts.clear()
    det2 = ddos.Detector(ddos.Settings(flows_ps=100), alerts.append)
    for sec in range(6):
        det2.observe_new_flows(T0 + sec * NS, [(FLOODERS[0], SERVER, 80, False)] * 300)
    det2.tick(T0 + 7 * NS)
    assert alerts and alerts[0].category == "flow-flood"


def test_episode_realerts_for_new_sources_and_mitigates_once_per_ttl():
    rec = Recorder()
    alerts: list[Alert] = []
    det = ddos.Detector(ddos.Settings(mitigation="block", ttl_ns=30 * NS), alerts.append,
                        mitigator=rec)
    for sec in range(20):
        ts = T0 + sec * NS
        srcs = FLOODERS[:1] if sec < 8 else FLOODERS
        det.observe_new_flows(ts, [])
        for s in srcs:
            for k in range(100):
                det.observe(_event(s, ts + k * 1000))
    det.tick(T0 + 21 * NS)
    assert [a.top_sources.split()[0] in FLOODERS for a in alerts] == [True, True]
    assert sorted(c[1] for c in rec.calls) == sorted(FLOODERS)


def test_lapsed_mitigation_is_renewed_while_the_attack_goes_on():
    # A limit above the thresholds (or a TTL shorter than the attack): the source stays
    # over the threshold, its limit lapses after 3 s and is written again.
    rec = Recorder()
    alerts, _, _ = run(ddos.Settings(mitigation="ratelimit", ttl_ns=3 * NS), seconds=14,
                       flood={FLOODERS[0]: 100}, start=2, stop=14, mitigator=rec)
    assert [c[1] for c in rec.calls] == [FLOODERS[0]] * len(rec.calls)
    assert len(rec.calls) == len(alerts) >= 3
    gaps = [b.ts_ns - a.ts_ns for a, b in zip(alerts, alerts[1:])]
    assert all(g == 3 * NS for g in gaps), gaps


def test_bounds_and_settings():
    with pytest.raises(ValueError, match="mitigation"):
        ddos.Settings(mitigation="drop")
    with pytest.raises(ValueError, match="window"):
        ddos.Settings(window_ns=NS, history_ns=NS // 2)
    det = ddos.Detector(ddos.Settings(), lambda a: None)
    many = [(f"198.19.{i // 250}.{i % 250}", SERVER, 80, False)
            for i in range(ddos.MAX_KEYS + 10)]
    det.observe_new_flows(T0, many)
    assert det.stats.keys_overflow == 10
    assert det._cur.flows[(f"{SERVER}:80", ddos.OTHER)] == 10


def _event(src: str, ts: int) -> L7Event:
    from sensor.model import HttpEvent

    return L7Event(uid="C1", ts_ns=ts, src_addr=src, dst_addr=SERVER, src_port=40000,
                   dst_port=80, protocol=6, detail=HttpEvent(method="GET", path="/",
                                                             version="HTTP/1.1", status=200))
