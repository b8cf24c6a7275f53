"""L7 DDoS detection and mitigation (docs/rules.md, "DDoS").

What it counts, per second of event time (packet time in replay, the event's wall time
live), toward each service (server address and port):
- requests and error answers (status >= 400) per source, from HTTP and HTTP/2 events,
  and requests per endpoint (method and path without its query, cut at
  MAX_ENDPOINT_CHARS; not templated, which would cost more than the rest of the event);
- new flows per source, and how many are still half open (SYN, no completed handshake),
  from the kernel's flow map (live: every flow the meter sees, selected or not);
- request heads held open incompletely, per source, from the HTTP/1 parsers' state
  (a head whose first byte is older than slow_head_ns and whose end has not come).

Rates are sliding-window averages over `window_ns` (sums of one-second buckets, updated
as buckets enter and leave the window). Every window, when no attack is under way, each
service's request and new-flow rates and the busiest source's request rate are sampled
into a baseline ring (history_ns of samples); its p99 is the baseline. Once a ring holds
learn_ns worth of samples, a threshold is max(its absolute floor, factor x p99); before
that only the absolute floors apply. Samples taken during an attack are not kept, so an
attack never teaches the baseline that it is normal.

Detections, evaluated once a second:
- http-flood: a source's request rate reaches the per-source threshold (a flood from one
  source), or a service's total rate reaches the per-service threshold (a flood from
  many). The alert names the sources above the source floor, busiest first; a client
  polling at a few requests a second stays below it and is never named.
- flow-flood / syn-flood: a service's new-flow rate reaches its threshold (syn-flood when
  most of those flows are half open).
- slow-request: a service has at least slow_heads incomplete heads older than
  slow_head_ns; the alert names the sources holding at least SLOW_SOURCE_HEADS of them.

An attack on a service is one episode: it alerts when it starts, when a source not yet
named joins it or a named source's mitigation lapses while it goes on (the source is then
mitigated again), and every REALERT_NS while it lasts; it ends after a window without
detection. Mitigation, per the configuration, applies to the named sources: count (the
alert only), block (a source ban for ttl_ns, bpf block_src) or ratelimit (a token bucket
per source, bpf rate_src). A source under a mitigation is not mitigated again before it
expires.

Bounds: MAX_KEYS (service, source) pairs per counter and window (more are counted under
the service with the source "other", which is never named or mitigated), MAX_SERVICES
baselines (least recently updated out), MAX_MITIGATED sources remembered.

The inputs come from sensor/rules/ddos_live.py in the live sensor and from
sensor/rules/ddos_replay.py in `loupe replay --ddos` (packet time; nothing mitigated).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

from sensor.model import Alert, L7Event

NS = 10**9
MODES = ("count", "block", "ratelimit")
REQUEST_KINDS = frozenset(("http", "http2"))
OTHER = "other"            # the source of counts beyond MAX_KEYS
MAX_KEYS = 65536           # (service, source) pairs per counter: ~150 bytes each, x window
MAX_SERVICES = 1024        # services with a baseline
MAX_MITIGATED = 16384      # as many as the kernel's rate_src / block_src maps hold
SLOW_SOURCE_HEADS = 3      # a browser keeps a few connections; more stalled heads is not it
REALERT_NS = 60 * NS
MAX_TOP = 32
MAX_ENDPOINT_CHARS = 96    # of "METHOD /path": enough to tell endpoints apart in an alert

RULE_HTTP = "loupe-ddos-http-flood"
RULE_FLOWS = "loupe-ddos-flow-flood"
RULE_SLOW = "loupe-ddos-slow-requests"


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """The [ddos] section (sensor/config.py DdosConfig) in the detector's units."""

    window_ns: int = 5 * NS
    learn_ns: int = 600 * NS
    history_ns: int = 3600 * NS
    factor: int = 4
    source_rps: int = 50         # one source's requests/s: a flood
    service_rps: int = 500       # one service's requests/s from all sources: a flood
    source_floor_rps: int = 5    # a flood names only sources at or above this
    flows_ps: int = 200          # one service's new flows/s: a flow flood
    slow_heads: int = 50         # incomplete heads to one service: a slow attack
    slow_head_ns: int = 5 * NS   # how old an incomplete head is before it counts
    top: int = 10                # sources named in an alert
    mitigation: str = "count"    # count | block | ratelimit
    ttl_ns: int = 300 * NS       # how long a mitigation lasts
    rate: int = 20               # ratelimit: packets/s per source (SYNs and payload)
    burst: int = 40              # ratelimit: bucket size

    def __post_init__(self) -> None:
        if self.mitigation not in MODES:
            raise ValueError(f"mitigation={self.mitigation!r} is not one of {', '.join(MODES)}")
        if self.window_ns < NS or self.history_ns < self.window_ns:
            raise ValueError("window must be at least 1 s and history at least a window")
        if not 1 <= self.top <= MAX_TOP:
            raise ValueError(f"top must be 1..{MAX_TOP}")

    @property
    def window_s(self) -> int:
        return self.window_ns // NS


class Mitigator(Protocol):
    """Where mitigations go (live: sensor/enforce/ratelimit.KernelMitigator). Each returns
    the expiry in Unix ns, or 0 when nothing was enforced."""

    def block(self, source: str, ttl_ns: int, note: str) -> int: ...

    def limit(self, source: str, rate: int, burst: int, ttl_ns: int, note: str) -> int: ...


class Baseline:
    """Window-average rates, one sample per window, the last `size` of them."""

    __slots__ = ("_ring", "_learn", "_p99")

    def __init__(self, size: int, learn: int) -> None:
        self._ring: deque[float] = deque(maxlen=max(1, size))
        self._learn = max(1, learn)
        self._p99: float | None = None

    def add(self, rate: float) -> None:
        self._ring.append(rate)
        self._p99 = None

    @property
    def learned(self) -> bool:
        return len(self._ring) >= self._learn

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile (q in 0..100) of the samples; 0.0 with none."""
        if not self._ring:
            return 0.0
        ordered = sorted(self._ring)
        return ordered[min(len(ordered) - 1, max(0, int(q / 100 * len(ordered) + 0.5) - 1))]

    def p99(self) -> float:
        if self._p99 is None:   # sorted once per sample, only when a threshold needs it
            self._p99 = self.percentile(99)
        return self._p99

    def threshold(self, floor: float, factor: int) -> tuple[float, float]:
        """(threshold, the baseline used: 0 while learning)."""
        if not self.learned:
            return float(floor), 0.0
        p = self.p99()
        return max(float(floor), factor * p), p


@dataclass(slots=True)
class _Second:
    """One second's counts: (service, source) -> n."""

    requests: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    flows: dict = field(default_factory=dict)
    half_open: dict = field(default_factory=dict)
    endpoints: dict = field(default_factory=dict)   # (service, "GET /path") -> n


@dataclass(slots=True)
class _Episode:
    started_ns: int
    last_seen_ns: int
    last_alert_ns: int = 0
    named: set = field(default_factory=set)


@dataclass(slots=True)
class DdosStats:
    events: int = 0
    new_flows: int = 0
    keys_overflow: int = 0       # counts put under OTHER (MAX_KEYS reached)
    services_evicted: int = 0
    alerts: dict = field(default_factory=dict)          # by rule id
    mitigated: dict = field(default_factory=dict)       # by mode
    mitigation_errors: int = 0
    baseline_samples: int = 0


def _bump(d: dict, key, stats: DdosStats, n: int = 1) -> None:
    v = d.get(key)
    if v is not None:
        d[key] = v + n
    elif len(d) < MAX_KEYS:
        d[key] = n
    else:
        stats.keys_overflow += 1
        other = (key[0], OTHER)
        d[other] = d.get(other, 0) + n


def service(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _split(svc: str) -> tuple[str, int]:
    host, _, port = svc.rpartition(":")
    return host.strip("[]"), int(port)


class Detector:
    """Feed it observe*() calls in time order and tick() at least once a second; alerts
    go to `emit`, mitigations to `mitigator` (None: counted, nothing enforced)."""

    def __init__(self, settings: Settings, emit: Callable[[Alert], None], *,
                 mitigator: Mitigator | None = None, sensor_id: str = "") -> None:
        self.settings = settings
        self.emit = emit
        self.mitigator = mitigator
        self.sensor_id = sensor_id
        self.stats = DdosStats()
        w = settings.window_s
        self._samples = max(1, settings.history_ns // settings.window_ns)
        self._learn = max(1, settings.learn_ns // settings.window_ns)
        self._sec = -1                          # the second being counted
        self._cur = _Second()
        self._window: deque[_Second] = deque(maxlen=w)
        self._sums = _Second()                  # the window's totals, kept incrementally
        self._req_base: OrderedDict[str, Baseline] = OrderedDict()
        self._flow_base: OrderedDict[str, Baseline] = OrderedDict()
        self._src_base = Baseline(self._samples, self._learn)
        self._slow: dict[str, dict[str, int]] = {}   # service -> source -> stalled heads
        self._episodes: dict[tuple[str, str], _Episode] = {}
        self._mitigated: OrderedDict[str, int] = OrderedDict()   # source -> expiry (event ns)

    # -- input ---------------------------------------------------------------------------

    def observe(self, event: L7Event) -> None:
        """One L7 event: a request (HTTP and HTTP/2; other kinds are not counted)."""
        if event.kind not in REQUEST_KINDS:
            return
        self.stats.events += 1
        sec = event.ts_ns // NS
        if sec != self._sec:
            self._advance(sec)
        svc = service(event.dst_addr, event.dst_port)
        key = (svc, event.src_addr)
        cur = self._cur
        _bump(cur.requests, key, self.stats)
        d = event.detail
        if d.status >= 400:
            _bump(cur.errors, key, self.stats)
        path = d.path
        q = path.find("?")
        _bump(cur.endpoints, (svc, f"{d.method} {path if q < 0 else path[:q]}"
                              [:MAX_ENDPOINT_CHARS]), self.stats)

    def observe_new_flows(self, ts_ns: int, flows: Iterable[tuple[str, str, int, bool]]) -> None:
        """Flows the meter started since the last call: (source, server address, server
        port, half open)."""
        sec = ts_ns // NS
        if sec != self._sec:
            self._advance(sec)
        cur = self._cur
        stats = self.stats
        for src, dst, port, half in flows:
            key = (service(dst, port), src)
            _bump(cur.flows, key, stats)
            if half:
                _bump(cur.half_open, key, stats)
            stats.new_flows += 1

    def observe_slow_heads(self, ts_ns: int, heads: Iterable[tuple[str, str, int, int]]) -> None:
        """The incomplete request heads held now: (source, server address, server port,
        age in ns). Replaces the previous snapshot."""
        slow: dict[str, dict[str, int]] = {}
        limit = self.settings.slow_head_ns
        for src, dst, port, age in heads:
            if age >= limit:
                per = slow.setdefault(service(dst, port), {})
                per[src] = per.get(src, 0) + 1
        self._slow = slow
        self.tick(ts_ns)

    def tick(self, now_ns: int) -> None:
        """Closes every second before now_ns's (evaluating each): call it at least once a
        second, live, so an attack that stops all events is still seen to end."""
        sec = now_ns // NS
        if sec > self._sec:
            self._advance(sec)

    # -- the window ------------------------------------------------------------------------

    def _advance(self, sec: int) -> None:
        if self._sec < 0:
            self._sec = sec
            return
        if sec < self._sec:
            return   # a late event: counted in the current second
        # Close the current second, then empty ones up to sec (at most a window's worth
        # matter: older ones have left the window anyway).
        gap = sec - self._sec
        self._close(self._cur, self._sec)
        for i in range(1, min(gap, self.settings.window_s + 1)):
            self._close(_Second(), self._sec + i)
        self._cur = _Second()
        self._sec = sec

    def _close(self, second: _Second, sec: int) -> None:
        if len(self._window) == self._window.maxlen:
            self._fold(self._window[0], -1)
        self._window.append(second)
        self._fold(second, +1)
        self._evaluate((sec + 1) * NS)

    def _fold(self, second: _Second, sign: int) -> None:
        for name in ("requests", "errors", "flows", "half_open", "endpoints"):
            sums = getattr(self._sums, name)
            for key, n in getattr(second, name).items():
                v = sums.get(key, 0) + sign * n
                if v > 0:
                    sums[key] = v
                else:
                    sums.pop(key, None)

    # -- detection -------------------------------------------------------------------------

    @staticmethod
    def _by_service(counts: dict) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (svc, src), n in counts.items():
            per = out.get(svc)
            if per is None:
                per = out[svc] = {}
            per[src] = n
        return out

    def _baseline(self, table: OrderedDict, svc: str) -> Baseline:
        b = table.get(svc)
        if b is None:
            if len(table) >= MAX_SERVICES:
                table.popitem(last=False)
                self.stats.services_evicted += 1
            b = table[svc] = Baseline(self._samples, self._learn)
        else:
            table.move_to_end(svc)
        return b

    def _evaluate(self, now_ns: int) -> None:
        s = self.settings
        w = s.window_s
        attacked: set[str] = set()
        requests = self._by_service(self._sums.requests)
        errors = self._by_service(self._sums.errors)
        src_limit, src_base = self._src_base.threshold(s.source_rps, s.factor)
        floor = max(float(s.source_floor_rps), s.factor * src_base if src_base else 0.0)
        busiest = 0.0
        for svc, per in requests.items():
            total = sum(per.values()) / w
            busiest = max(busiest, max((n for src, n in per.items() if src != OTHER),
                                       default=0) / w)
            limit, base = self._baseline(self._req_base, svc).threshold(s.service_rps, s.factor)
            flooders = any(n / w >= src_limit for src, n in per.items() if src != OTHER)
            if total >= limit or flooders:
                attacked.add(svc)
                errs = sum(errors.get(svc, {}).values()) / w
                ep, n = self._busiest_endpoint(svc)
                self._detected(now_ns, RULE_HTTP, "http-flood", svc, per, floor, total,
                               base, "req/s", f"errors {errs:.0f}/s, busiest endpoint "
                               f"{ep or '-'} {n / w:.0f}/s",
                               max(limit if total >= limit else src_limit, 0))
        flows = self._by_service(self._sums.flows)
        half = self._by_service(self._sums.half_open)
        for svc, per in flows.items():
            total = sum(per.values()) / w
            limit, base = self._baseline(self._flow_base, svc).threshold(s.flows_ps, s.factor)
            if total >= limit:
                attacked.add(svc)
                halfs = sum(half.get(svc, {}).values()) / w
                category = "syn-flood" if halfs * 2 >= total else "flow-flood"
                self._detected(now_ns, RULE_FLOWS, category, svc, per, floor, total, base,
                               "new flows/s", f"half open {halfs:.0f}/s", limit)
        for svc, per in self._slow.items():
            held = sum(per.values())
            if held >= s.slow_heads:
                attacked.add(svc)
                self._detected(now_ns, RULE_SLOW, "slow-request", svc, per,
                               SLOW_SOURCE_HEADS, held, 0.0, "incomplete heads",
                               f"older than {s.slow_head_ns / NS:g} s", s.slow_heads,
                               per_window=False)
        self._end_episodes(now_ns)
        # The baseline: one sample per window, of quiet windows only.
        if (now_ns // NS) % w == 0:
            self._sample(requests, flows, busiest, attacked)

    def _busiest_endpoint(self, svc: str) -> tuple[str, int]:
        best, most = "", 0
        for (s, ep), n in self._sums.endpoints.items():
            if s == svc and n > most and ep != OTHER:
                best, most = ep, n
        return best, most

    def endpoint_rates(self, svc: str) -> dict[str, float]:
        """Requests/s per endpoint ("GET /path") of one service over the window."""
        w = self.settings.window_s
        return {ep: n / w for (s, ep), n in self._sums.endpoints.items() if s == svc}

    def _sample(self, requests: dict, flows: dict, busiest: float, attacked: set) -> None:
        w = self.settings.window_s
        for svc, per in requests.items():
            if svc not in attacked:
                self._baseline(self._req_base, svc).add(sum(per.values()) / w)
        for svc, per in flows.items():
            if svc not in attacked:
                self._baseline(self._flow_base, svc).add(sum(per.values()) / w)
        if not attacked:
            self._src_base.add(busiest)
            self.stats.baseline_samples += 1

    def _end_episodes(self, now_ns: int) -> None:
        w = self.settings.window_ns
        for k in [k for k, e in self._episodes.items() if now_ns - e.last_seen_ns > w]:
            del self._episodes[k]

    def _detected(self, now_ns: int, rule: str, category: str, svc: str,
                  per: dict[str, int], floor: float, total: float, base: float, unit: str,
                  more: str, threshold: float, *, per_window: bool = True) -> None:
        s = self.settings
        div = s.window_s if per_window else 1
        named = sorted(((n / div, src) for src, n in per.items()
                        if src != OTHER and n / div >= floor), reverse=True)[:s.top]
        sources = [src for _, src in named]
        ep = self._episodes.get((rule, svc))
        if ep is None:
            ep = self._episodes[(rule, svc)] = _Episode(now_ns, now_ns)
        ep.last_seen_ns = now_ns
        # A source is news when the episode has not named it yet, or when its mitigation
        # has lapsed while the attack goes on (a rate limit above the thresholds, a TTL
        # shorter than the attack): it is mitigated again, with a new alert.
        fresh = [src for src in sources if src not in ep.named or self._lapsed(src, now_ns)]
        if ep.last_alert_ns and not fresh and now_ns - ep.last_alert_ns < REALERT_NS:
            return
        ep.last_alert_ns = now_ns
        ep.named.update(sources)
        enforced, expires = self._mitigate(now_ns, rule, sources)
        dst, port = _split(svc)
        rate = sum(r for r, _ in named) if named else total
        what = (f"{total:.0f} {unit} toward {svc} (threshold {threshold:.0f}"
                + (f", baseline p99 {base:.1f}" if base else ", baseline learning")
                + f"), {more}; {len(per)} sources, {len(sources)} named")
        action = "count" if s.mitigation == "count" else "block"
        self.stats.alerts[rule] = self.stats.alerts.get(rule, 0) + 1
        self.emit(Alert(
            rule_id=rule, action=action, field="rate", excerpt=what[:256],
            reason=f"{category}: {len(sources)} source(s) at {rate:.0f} {unit}",
            severity="high", category=category, ts_ns=now_ns,
            event_kind="flow" if rule == RULE_FLOWS else "http",
            src_addr=sources[0] if sources else "", dst_addr=dst, dst_port=port,
            sensor_id=self.sensor_id, count=int(total * div), enforced=enforced,
            block_expires_ns=expires, rate=int(rate), top_sources=" ".join(sources),
            mitigation=s.mitigation, window_ns=s.window_ns if per_window else 0,
            baseline=int(base)))

    # -- mitigation ------------------------------------------------------------------------

    def _lapsed(self, src: str, now_ns: int) -> bool:
        if self.settings.mitigation == "count" or self.mitigator is None:
            return False
        until = self._mitigated.get(src)
        return until is None or until <= now_ns

    def _mitigate(self, now_ns: int, rule: str, sources: list[str]) -> tuple[bool, int]:
        s = self.settings
        if s.mitigation == "count" or self.mitigator is None or not sources:
            return False, 0
        done = False
        expires = 0
        for src in sources:
            until = self._mitigated.get(src)
            if until is not None and until > now_ns:
                done = True
                continue
            try:
                if s.mitigation == "block":
                    got = self.mitigator.block(src, s.ttl_ns, rule)
                else:
                    got = self.mitigator.limit(src, s.rate, s.burst, s.ttl_ns, rule)
            except (OSError, ValueError):
                self.stats.mitigation_errors += 1
                continue
            if got:
                done = True
                expires = max(expires, got)
                self._mitigated[src] = now_ns + s.ttl_ns
                self._mitigated.move_to_end(src)
                if len(self._mitigated) > MAX_MITIGATED:
                    self._mitigated.popitem(last=False)
                self.stats.mitigated[s.mitigation] = self.stats.mitigated.get(s.mitigation, 0) + 1
        return done, expires

    # -- reading ---------------------------------------------------------------------------

    def rates(self) -> dict[str, dict[str, float]]:
        """Per service: requests/s, errors/s, new flows/s, half open/s, incomplete heads
        (the metrics endpoint shows these)."""
        w = self.settings.window_s
        out: dict[str, dict[str, float]] = {}
        for name in ("requests", "errors", "flows", "half_open"):
            for (svc, _), n in getattr(self._sums, name).items():
                row = out.setdefault(svc, {})
                row[name] = row.get(name, 0.0) + n / w
        for svc, per in self._slow.items():
            out.setdefault(svc, {})["slow_heads"] = float(sum(per.values()))
        return out

