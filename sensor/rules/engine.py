"""The rules engine: every L7 event against a rule set, with AWS WAF rule-group semantics.

Entries (rules and managed groups) run in priority order (lower first; file order breaks
ties). A match makes an Alert. `count` and `alert` never stop evaluation; the first
`allow` or `block` that matches decides and ends it; if none does, the rule set's default
action decides (allow unless the files say otherwise). A `block` decision goes to the
verdict callback (kernel enforcement plugs in there; this module writes no map itself).

Threshold rules (credential stuffing, enumeration, scanner 404s) count matching events per
key (source, endpoint, ...) in fixed windows of packet time (replay) or wall time (live,
the event's own timestamp either way). They alert once per key and window, when the count
reaches the threshold, and their action applies to every matching event of that key for
the rest of the window. Their state is bounded (MAX_KEYS keys, least recently used out).

The engine is a plain object: `evaluate(event, raw)` returns a Verdict and the Alerts.
Analyzer wraps it for the L7 engine's analyze hook and makes reloading atomic: the
rule set is replaced between two events, never during one.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Callable

from sensor.l7.redact import REDACTED, redact_target, sensitive
from sensor.model import MAX_EXCERPT, Alert, L7Event
from sensor.rules import managed
from sensor.rules.fields import Subject
from sensor.rules.request import Request

TERMINAL = ("allow", "block")
EARLY_PENDING = 1024   # requests enforced early whose transaction is not out yet
MAX_KEYS = 65536   # threshold keys held (sources x endpoints); ~200 bytes each
_HAS_ID = re.compile(r"/(?:\d|[0-9a-f]{8}-|[A-Za-z0-9_-]{16})", re.I)
# An id-like path segment: a number, a UUID, a long hex or token string. One regex over
# the whole path (no per-segment loop): this runs on every GET when enumeration is on.
_ID_SEGMENT = re.compile(
    r"(?<=/)(?:\d+|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{16,}"
    r"|[A-Za-z0-9_-]{20,})(?=/|$)", re.I)


def template(path: str) -> tuple[str, str]:
    """(templated path, the id values joined): /users/42/orders/7 -> /users/{id}/orders/{id}."""
    path = path.split("?", 1)[0]
    ids = _ID_SEGMENT.findall(path)
    if not ids:
        return path, ""
    return _ID_SEGMENT.sub("{id}", path), "/".join(ids)


@dataclass(frozen=True, slots=True)
class Condition:
    field: str
    test: Callable[[Subject], tuple[str, str, str] | None]   # (field, value, reason) or None
    negate: bool = False

    def match(self, subject: Subject) -> tuple[str, str, str] | None:
        hit = self.test(subject)
        if self.negate:
            return None if hit is not None else (self.field, "", "not matched")
        return hit


@dataclass(frozen=True, slots=True)
class Threshold:
    count: int
    window_ns: int
    by: str = "src"           # src | endpoint | src+endpoint | src+template
    distinct: str = ""        # "" (count events) or "id" (count distinct ids of the path)


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    priority: int
    action: str
    conditions: tuple[Condition, ...] = ()
    severity: str = "medium"
    category: str = ""
    group: managed.Group | None = None     # a managed group instead of conditions
    threshold: Threshold | None = None
    log: bool = True                       # an `allow` match writes an Alert only if set
    order: int = 0                          # position in the files: breaks priority ties
    source: str = ""                        # file:line, for `rules check` and errors
    cheap_first: tuple[int, ...] = ()       # condition indexes, cheapest test first
    block_source_ttl_ns: int = 0            # block: also ban the source this long (live)


@dataclass(frozen=True, slots=True)
class RuleSet:
    rules: tuple[Rule, ...] = ()
    default_action: str = "allow"
    body_bytes: int = 8192        # request body prefix captured for inspection
    body_paths: tuple[str, ...] = ("/",)   # path prefixes whose bodies are captured

    def sorted(self) -> "RuleSet":
        rules = tuple(sorted(self.rules, key=lambda r: (r.priority, r.order)))
        return RuleSet(rules, self.default_action, self.body_bytes, self.body_paths)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision for one event. Kernel enforcement (flow drop, source ban) consumes
    `block` verdicts through Analyzer's on_verdict callback."""

    action: str                # allow or block
    rule_id: str               # "" when the default action decided
    event: L7Event
    source_ttl_ns: int = 0     # block: ban the event's source this long too (0: no)


@dataclass(slots=True)
class _Window:
    start: int
    count: int = 0
    ids: set = field(default_factory=set)
    fired: bool = False


@dataclass(slots=True)
class EngineStats:
    events: int = 0
    alerts: dict[str, int] = field(default_factory=dict)    # by rule id
    verdicts: dict[str, int] = field(default_factory=dict)  # by action
    threshold_keys_evicted: int = 0
    detector_errors: int = 0


def excerpt(field_name: str, value: str) -> str:
    """A bounded, redacted excerpt of a matched value: secrets (sensitive parameter
    names, cookies, credentials) are never copied, targets lose their secrets."""
    name = field_name.partition(":")[2]
    if field_name.startswith(("cookie", "header:authorization", "header:proxy-authorization")) \
            or (name and sensitive(name)):
        return REDACTED
    if field_name in ("uri", "path", "head"):
        value = redact_target(value)
    value = value.replace("\r", "\\r").replace("\n", "\\n")
    if len(value) > MAX_EXCERPT:
        value = value[:MAX_EXCERPT - 3] + "..."
    return value


class Engine:
    def __init__(self, rules: RuleSet) -> None:
        self.rules = rules.sorted()
        # The value detectors of the enabled groups: judged together, once per value.
        self.detectors = tuple(dict.fromkeys(
            r.group.name for r in self.rules.rules
            if r.group is not None and r.group.name in managed.VALUE_DETECTORS))
        self.stats = EngineStats()
        self._windows: OrderedDict[tuple, _Window] = OrderedDict()
        # Rules that a request alone decides (early()): managed groups and conditions on
        # request fields, no threshold (windows count whole events).
        self._early = tuple((r, _request_only(r)) for r in self.rules.rules)
        self.early_blocks = any(ok and r.action == "block" for r, ok in self._early)

    def early(self, event: L7Event, raw: tuple[bytes, bytes] | None) -> Verdict | None:
        """The verdict on a request before its response (live enforcement), or None
        when the request alone cannot decide it: no rule up to the first terminal one
        that matches may depend on the response. No alert, no counting: evaluate() runs
        on the whole event later and writes those, to the same decision."""
        subject = Subject(event, Request(*raw) if raw is not None else None)
        for rule, ok in self._early:
            if not ok:
                if rule.action in TERMINAL:
                    return None   # it might decide first, on what is not known yet
                continue
            if self._match(rule, subject) is not None and rule.action in TERMINAL:
                return Verdict(rule.action, rule.id, event, rule.block_source_ttl_ns)
        return None

    def evaluate(self, event: L7Event, raw: tuple[bytes, bytes] | None = None
                 ) -> tuple[Verdict, list[Alert]]:
        self.stats.events += 1
        subject = Subject(event, Request(*raw) if raw is not None else None)
        alerts: list[Alert] = []
        for rule in self.rules.rules:
            hit = self._match(rule, subject)
            if hit is None:
                continue
            fld, value, reason, count, fire = hit
            if fire and (rule.action != "allow" or rule.log):
                alerts.append(self._alert(rule, event, fld, value, reason, count))
            if rule.action in TERMINAL:
                return self._decide(rule.action, rule.id, event,
                                    rule.block_source_ttl_ns), alerts
        return self._decide(self.rules.default_action, "", event), alerts

    def _decide(self, action: str, rule_id: str, event: L7Event, source_ttl_ns: int = 0
                ) -> Verdict:
        v = self.stats.verdicts
        v[action] = v.get(action, 0) + 1
        return Verdict(action, rule_id, event, source_ttl_ns)

    def _match(self, rule: Rule, subject: Subject):
        """(field, value, reason, count, alert now) when the rule applies, else None."""
        if rule.group is not None:
            if subject.request is None:
                return None
            try:
                finding = rule.group.scan(subject.request, self.detectors)
            except RecursionError:   # a detector bug must not take the sensor down
                self.stats.detector_errors += 1
                return None
            if finding is None:
                return None
            return finding.field, finding.value, finding.reason, 0, True
        # Conditions are ANDed: cheap ones run first (rule.cheap_first), and the hit
        # reported is the first condition's in the file, whatever ran first.
        first = None
        for i in rule.cheap_first:
            hit = rule.conditions[i].match(subject)
            if hit is None:
                return None
            if i == 0:
                first = hit
        fld, value, reason = first if first is not None else ("", "", "matched")
        if rule.threshold is None:
            return fld, value, reason, 0, True
        return self._count(rule, subject, fld, value, reason)

    def _count(self, rule: Rule, subject: Subject, fld: str, value: str, reason: str):
        th = rule.threshold
        ev = subject.event
        path = subject.path()
        if th.distinct and not _HAS_ID.search(path):
            return None   # no id-like segment: nothing to enumerate (the common case)
        tpl, ids = template(path) if th.by.endswith("template") or th.distinct else (path, "")
        if th.distinct and not ids:
            return None   # nothing to enumerate on this path
        by = th.by
        if by == "src":
            key = (rule.id, ev.src_addr)
        else:
            endpoint = subject.host() + (tpl if by == "src+template" else path)
            key = (rule.id, endpoint) if by == "endpoint" else (rule.id, ev.src_addr, endpoint)
        w = self._windows.get(key)
        ts = ev.ts_ns
        if w is None or ts - w.start >= th.window_ns or ts < w.start:
            w = _Window(ts)
            self._windows[key] = w
            while len(self._windows) > MAX_KEYS:
                self._windows.popitem(last=False)
                self.stats.threshold_keys_evicted += 1
        self._windows.move_to_end(key)
        if th.distinct:
            if len(w.ids) < th.count:   # bounded: no need to remember more than the threshold
                w.ids.add(ids)
            n = len(w.ids)
        else:
            w.count += 1
            n = w.count
        if n < th.count:
            return None
        fire = not w.fired
        w.fired = True
        counted = "distinct ids" if th.distinct else "events"
        what = f"{n} {counted} in {th.window_ns // 10**9} s by {th.by}"
        return ("path" if th.distinct else fld, tpl if th.distinct else value,
                f"{reason}; {what}" if reason and reason != "matched" else what, n, fire)

    def _alert(self, rule: Rule, ev: L7Event, fld: str, value: str, reason: str,
               count: int) -> Alert:
        a = self.stats.alerts
        a[rule.id] = a.get(rule.id, 0) + 1
        return Alert(
            rule_id=rule.id, action=rule.action, field=fld, excerpt=excerpt(fld, value),
            reason=reason[:MAX_EXCERPT], severity=rule.severity, category=rule.category,
            community_id=ev.community_id, uid=ev.uid, ts_ns=ev.ts_ns, event_kind=ev.kind,
            src_addr=ev.src_addr, dst_addr=ev.dst_addr, src_port=ev.src_port,
            dst_port=ev.dst_port, sensor_id=ev.sensor_id, count=count)


class Analyzer:
    """The L7 engine's analyze hook: alerts to `emit`, verdicts to `on_verdict`.

    `capture` is what the HTTP/1 parser calls (its `inspect` option) to ask how many
    request body bytes to keep: `body_bytes` for form and JSON bodies on the paths the
    rule set selects, nothing otherwise (the one place where the budget grants body bytes,
    docs/rules.md)."""

    def __init__(self, rules: RuleSet, emit: Callable, *,
                 on_verdict: Callable[[Verdict], None] | None = None,
                 current_flow: Callable[[], object | None] | None = None,
                 on_pass: Callable[[object], None] | None = None) -> None:
        self.engine = Engine(rules)
        self.emit = emit
        self.on_verdict = on_verdict
        # Hold mode (sensor/enforce/hold.py): told of every complete request that is not
        # blocked, with its flow, so that the kernel lets the response go.
        self.on_pass = on_pass
        # Live enforcement: the flow (sensor.engine.flowtable.FlowState) whose payload is
        # being parsed, for verdicts on a request before its response (request_done()).
        self.current_flow = current_flow
        self._early: OrderedDict[int, tuple[bytes, object]] = OrderedDict()
        self.reloads = 0

    @property
    def early_on(self) -> bool:
        return (self.on_verdict is not None and self.current_flow is not None
                and self.engine.early_blocks)

    def request_done(self, txn) -> None:
        """A request is complete and its response not seen (the HTTP/1 parser's
        on_request). A block that the request alone decides is enforced now, while the
        server is still working on it; the whole transaction's evaluation later writes
        the alerts, marked with what was enforced here, and does not enforce again."""
        raw = getattr(txn, "request", None)
        flow = self.current_flow() if self.early_on else None
        if flow is None or raw is None:
            self._passed()
            return
        i = flow.init
        event = L7Event(uid=flow.uid or "early", community_id=flow.cid, ts_ns=txn.ts_ns,
                        src_addr=flow.src_text, dst_addr=flow.dst_text,
                        src_port=flow.port[i], dst_port=flow.port[1 - i],
                        protocol=flow.protocol, detail=txn.detail)
        verdict = self.engine.early(event, raw)
        if verdict is None or verdict.action != "block":
            self._passed()
            return
        done = self.on_verdict(verdict)
        # Keyed by the raw head's identity: the whole transaction carries the same bytes
        # object. Bounded: a transaction whose end never comes ages out.
        self._early[id(raw[0])] = (raw[0], done)
        while len(self._early) > EARLY_PENDING:
            self._early.popitem(last=False)

    def _passed(self) -> None:
        if self.on_pass is not None and self.current_flow is not None:
            flow = self.current_flow()
            if flow is not None:
                self.on_pass(flow)

    def __call__(self, event: L7Event, raw) -> None:
        verdict, alerts = self.engine.evaluate(event, raw)
        if self.on_verdict is not None and verdict.action == "block":
            # Enforced first, so the deciding rule's Alert says what the kernel now does
            # (the callback returns sensor.enforce.enforcer.Enforcement, or None); once
            # only, when request_done() enforced it already.
            early = self._early.pop(id(raw[0]), None) if raw is not None and self._early \
                else None
            if early is not None and early[0] is raw[0]:
                done = early[1]
            else:
                done = self.on_verdict(verdict)
            if done is not None and done.enforced:
                alerts = [replace(a, enforced=True, block_expires_ns=done.expires_wall_ns,
                                  held_ns=getattr(done, "held_ns", 0))
                          if a.rule_id == verdict.rule_id and a.action == "block" else a
                          for a in alerts]
        for alert in alerts:
            self.emit(alert)

    def capture(self, method: str, target: str, content_type: str) -> int:
        rules = self.engine.rules
        if not rules.body_bytes or method in ("GET", "HEAD", "OPTIONS"):
            return 0
        if content_type and not _INSPECTED_BODY.search(content_type):
            return 0
        path = target.split("?", 1)[0]
        if not path.startswith(rules.body_paths):
            return 0
        return rules.body_bytes

    def reload(self, rules: RuleSet) -> None:
        """Swap the rule set between two events; threshold windows and counters stay
        (flows and their L7 state are not touched at all)."""
        stats, windows = self.engine.stats, self.engine._windows
        self.engine = Engine(rules)
        self.engine.stats, self.engine._windows = stats, windows
        self.reloads += 1


def _request_only(rule: Rule) -> bool:
    """Whether the request alone decides the rule (early verdicts)."""
    if rule.threshold is not None:
        return False
    if rule.group is not None:
        return True   # managed groups scan the raw request
    return all(c.field not in _RESPONSE_FIELDS and not c.field.startswith(("detail.", "pii"))
               for c in rule.conditions)


_RESPONSE_FIELDS = frozenset(("status",))

# Bodies the detectors can read as values: forms, JSON, XML, multipart, text.
_INSPECTED_BODY = re.compile(r"form|json|xml|text/", re.I)


def uses_requests(rules: RuleSet) -> bool:
    return any(r.group is not None or any(c.field in _RAW_FIELDS or c.field.startswith(
        ("arg:", "header:", "cookie:", "body")) for c in r.conditions) for r in rules.rules)


_RAW_FIELDS = frozenset(("uri", "query", "args", "headers", "cookies", "body"))
