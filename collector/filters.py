"""Subscription filters, Hubble style: one builder per RecordFilter criterion.

A RecordFilter entry matches a record when every criterion it sets matches (AND); the
values listed inside one criterion are alternatives (OR). A request's allow list passes
a record when any entry matches (an empty allow list passes everything), its deny list
when no entry matches.

Filters run on loupe.v1.Record messages, not on the model dataclasses: live records
reach the collector and leave it as protobuf, and turning each one into a dataclass only
to test a filter would cost ingest ~30 us per record per subscriber.

Criteria over an L7 field are declared by their protocol (sensor/l7/registry.py,
Protocol.filters: http_method, http_status, dns_rcode, ...) and match only L7 events of
that kind; those that name a Flow summary field (host, query name, SNI, JA4) or a key of
the flow's l7_summary map (Kafka topic, MongoDB collection, gRPC method) also match a flow
through it (a flow without that key never matches). Address and port criteria
never match a LostEvent, which has neither. Process and container match flows only: the
process is attributed per flow, and an L7 event reaches it through its flow's uid.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from typing import Callable, Iterable

from sensor.errors import ConfigError
from sensor.l7 import registry

Predicate = Callable[[object], bool]

# Flows, every registered L7 kind (sensor/l7/registry.py; its L7Event oneof field), loss.
RECORD_KINDS = ("flow", *registry.kind_names(), "lost", "alert")

_STATUS = re.compile(r"^(?:(\d{3})|(\d{3})\+|(\d)xx|(\d{3})-(\d{3}))$")


class FilterError(ConfigError):
    """A filter value that cannot be understood (bad CIDR, bad status range...)."""


def kind_of(rec) -> str:
    kind = rec.WhichOneof("kind")
    if kind == "l7":
        return rec.l7.WhichOneof("detail") or ""
    return kind or ""


def _envelope(rec):
    """The message holding addresses and ports (Flow or L7Event), or None for LostEvent."""
    kind = rec.WhichOneof("kind")
    if kind == "flow":
        return rec.flow
    if kind == "l7":
        return rec.l7
    if kind == "alert":
        return rec.alert   # addresses and ports of the event it is about
    return None


# -- value parsers, shared with the CLI so that a bad flag fails before connecting -------

def parse_cidr(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise FilterError(f"{text!r} is not an IP address or CIDR (e.g. 198.18.0.0/15)") from None


def parse_status(text: str) -> tuple[int, int]:
    """"404" -> (404, 404); "500+" -> (500, 999); "4xx" -> (400, 499); "200-299"."""
    m = _STATUS.match(text.strip())
    if not m:
        raise FilterError(
            f"{text!r} is not an HTTP status filter: use 404, 500+, 4xx or 200-299"
        )
    exact, plus, klass, low, high = m.groups()
    if exact:
        return int(exact), int(exact)
    if plus:
        return int(plus), 999
    if klass:
        return int(klass) * 100, int(klass) * 100 + 99
    if int(low) > int(high):
        raise FilterError(f"{text!r}: the range is empty ({low} > {high})")
    return int(low), int(high)


def parse_kind(text: str) -> str:
    if text not in RECORD_KINDS:
        raise FilterError(f"{text!r} is not a record kind: use one of {', '.join(RECORD_KINDS)}")
    return text


# -- one builder per criterion -------------------------------------------------------------

def _addr_in(nets) -> Callable[[str], bool]:
    def test(addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in nets if net.version == ip.version)
    return test


def build_record_kind(values: Iterable[str]) -> Predicate:
    kinds = frozenset(parse_kind(v) for v in values)
    return lambda rec: kind_of(rec) in kinds


def build_source_ip(values: Iterable[str]) -> Predicate:
    test = _addr_in([parse_cidr(v) for v in values])

    def match(rec) -> bool:
        env = _envelope(rec)
        return env is not None and test(env.src_addr)
    return match


def build_destination_ip(values: Iterable[str]) -> Predicate:
    test = _addr_in([parse_cidr(v) for v in values])

    def match(rec) -> bool:
        env = _envelope(rec)
        return env is not None and test(env.dst_addr)
    return match


def build_ip(values: Iterable[str]) -> Predicate:
    test = _addr_in([parse_cidr(v) for v in values])

    def match(rec) -> bool:
        env = _envelope(rec)
        return env is not None and (test(env.src_addr) or test(env.dst_addr))
    return match


def build_source_port(values: Iterable[int]) -> Predicate:
    ports = frozenset(values)

    def match(rec) -> bool:
        env = _envelope(rec)
        return env is not None and env.src_port in ports
    return match


def build_destination_port(values: Iterable[int]) -> Predicate:
    ports = frozenset(values)

    def match(rec) -> bool:
        env = _envelope(rec)
        return env is not None and env.dst_port in ports
    return match


def build_port(values: Iterable[int]) -> Predicate:
    ports = frozenset(values)

    def match(rec) -> bool:
        env = _envelope(rec)
        return env is not None and (env.src_port in ports or env.dst_port in ports)
    return match


def build_protocol(values: Iterable[int]) -> Predicate:
    protos = frozenset(values)

    def match(rec) -> bool:
        env = _envelope(rec)
        return env is not None and env is not rec.alert and env.protocol in protos
    return match


def build_app_proto(values: Iterable[str]) -> Predicate:
    names = frozenset(v.lower() for v in values)

    def match(rec) -> bool:
        kind = rec.WhichOneof("kind")
        if kind == "flow":
            return rec.flow.app_proto.lower() in names
        if kind == "l7":
            return (rec.l7.WhichOneof("detail") or "") in names
        return False
    return match


def _globs(values: Iterable[str], fold: bool) -> Callable[[str], bool]:
    patterns = [v.lower().rstrip(".") if fold else v for v in values]

    def test(text: str) -> bool:
        if fold:
            text = text.lower().rstrip(".")
        return any(fnmatch.fnmatchcase(text, p) for p in patterns)
    return test


def _tester(match: str, values: list) -> Callable[[object], bool]:
    """The value test of one registered filter's match kind (registry.FILTER_MATCHES)."""
    if match == "glob":
        return _globs(values, fold=True)
    if match == "glob_case":
        return _globs(values, fold=False)
    if match == "upper":
        upper = frozenset(v.upper() for v in values)
        return lambda v: v.upper() in upper
    if match == "status":
        ranges = [parse_status(v) for v in values]
        return lambda v: any(lo <= v <= hi for lo, hi in ranges)
    if match == "contains":
        needles = [v.casefold() for v in values]
        return lambda v: any(n in v.casefold() for n in needles)
    allowed = frozenset(values)
    return allowed.__contains__


def l7_builder(declared: list[tuple[str, registry.Filter]]) -> Callable[[Iterable], Predicate]:
    """The builder of one filter name, from the (L7Event oneof field, Filter) of every
    protocol declaring it: matches those protocols' events by their event field, and flows
    by the summary field when one names it (a flow without it never matches a glob)."""
    fields = {oneof: flt.field for oneof, flt in declared}
    match_kind = declared[0][1].match
    # A flow_field is a Flow field (http_host, tls_sni) or a key of the flow's l7_summary
    # map (kafka_topic, mongodb_collection): each declaring protocol may name its own.
    named = list(dict.fromkeys(flt.flow_field for _, flt in declared if flt.flow_field))
    attrs = [f for f in named if f not in _SUMMARY_KEYS]
    keys = [f for f in named if f in _SUMMARY_KEYS]
    needs_value = match_kind in ("glob", "glob_case")

    def build(values: Iterable) -> Predicate:
        test = _tester(match_kind, list(values))

        def flow_matches(flow) -> bool:
            for value in [getattr(flow, a) for a in attrs] + [
                    flow.l7_summary.get(k, "") for k in keys if k in flow.l7_summary]:
                if (value or not needs_value) and test(value):
                    return True
            return False

        def match(rec) -> bool:
            kind = rec.WhichOneof("kind")
            if kind == "flow":
                return bool(named) and flow_matches(rec.flow)
            if kind != "l7":
                return False
            oneof = rec.l7.WhichOneof("detail")
            field = fields.get(oneof)
            if field is None:
                return False
            value = getattr(getattr(rec.l7, oneof), field)
            if isinstance(value, (str, int)):
                return test(value)
            return any(test(v) for v in value)   # a list field: any of its values
        return match
    return build


# Every registered l7_summary key (registry Protocol.summary_keys).
_SUMMARY_KEYS = frozenset(k for spec in registry.protocols() for k in spec.summary_keys)


def _l7_declared() -> dict[str, list[tuple[str, registry.Filter]]]:
    """Filter name -> (oneof, Filter) of each protocol declaring it, in registry order."""
    named: dict[str, list[tuple[str, registry.Filter]]] = {}
    for spec in registry.kinds():
        for flt in spec.filters:
            named.setdefault(flt.name, []).append((spec.oneof, flt))
    return named


def build_sensor_id(values: Iterable[str]) -> Predicate:
    sensors = frozenset(values)

    def match(rec) -> bool:
        kind = rec.WhichOneof("kind")
        return kind is not None and getattr(rec, kind).sensor_id in sensors
    return match


def _process(rec):
    """The flow's ProcessInfo message, or None (L7 and loss records carry no process)."""
    if rec.WhichOneof("kind") == "flow" and rec.flow.HasField("process"):
        return rec.flow.process
    return None


def build_process(values: Iterable[str]) -> Predicate:
    """Glob over the process name (comm) or its executable, full path or base name."""
    test = _globs(values, fold=False)

    def match(rec) -> bool:
        p = _process(rec)
        return p is not None and bool(p.comm or p.exe) and (
            test(p.comm) or test(p.exe) or test(p.exe.rpartition("/")[2]))
    return match


def build_container_id(values: Iterable[str]) -> Predicate:
    """Prefix of the container id: `docker ps` shows 12 characters of 64."""
    prefixes = tuple(v.lower() for v in values)

    def match(rec) -> bool:
        p = _process(rec)
        return p is not None and bool(p.container_id) and p.container_id.lower().startswith(prefixes)
    return match


def build_alert_rule(values: Iterable[str]) -> Predicate:
    test = _globs(values, fold=False)
    return lambda rec: rec.WhichOneof("kind") == "alert" and test(rec.alert.rule_id)


ALERT_ACTIONS = ("count", "alert", "allow", "block")


def build_alert_action(values: Iterable[str]) -> Predicate:
    actions = frozenset(v.lower() for v in values)
    bad = actions - set(ALERT_ACTIONS)
    if bad:
        raise FilterError(f"{sorted(bad)[0]!r} is not an alert action: use one of "
                          f"{', '.join(ALERT_ACTIONS)}")
    return lambda rec: rec.WhichOneof("kind") == "alert" and rec.alert.action in actions


def build_country(values: Iterable[str]) -> Predicate:
    """Flows with either end in one of these countries (geo from the sensor, docs/geo.md)."""
    codes = frozenset(v.upper() for v in values)

    def match(rec) -> bool:
        if rec.WhichOneof("kind") != "flow":
            return False
        return rec.flow.src_country in codes or rec.flow.dst_country in codes
    return match


def build_asn(values: Iterable[int]) -> Predicate:
    numbers = frozenset(int(v) for v in values)

    def match(rec) -> bool:
        if rec.WhichOneof("kind") != "flow":
            return False
        return rec.flow.src_asn in numbers or rec.flow.dst_asn in numbers
    return match


BUILDERS: dict[str, Callable[[Iterable], Predicate]] = {
    "record_kind": build_record_kind,
    "source_ip": build_source_ip,
    "destination_ip": build_destination_ip,
    "ip": build_ip,
    "source_port": build_source_port,
    "destination_port": build_destination_port,
    "port": build_port,
    "protocol": build_protocol,
    "app_proto": build_app_proto,
    # Each registered protocol's criteria (sensor/l7/registry.py, Protocol.filters).
    **{name: l7_builder(declared) for name, declared in _l7_declared().items()},
    "sensor_id": build_sensor_id,
    "process": build_process,
    "container_id": build_container_id,
    "alert_rule": build_alert_rule,
    "alert_action": build_alert_action,
    "country": build_country,
    "asn": build_asn,
}


def compile_filter(flt) -> Predicate:
    """One RecordFilter -> predicate: every set criterion must match."""
    preds = [build(list(getattr(flt, name))) for name, build in BUILDERS.items()
             if len(getattr(flt, name))]
    if not preds:
        return lambda rec: True
    if len(preds) == 1:
        return preds[0]
    return lambda rec: all(p(rec) for p in preds)


def compile_lists(allow, deny) -> Predicate:
    """Allow passes when any entry matches (or the list is empty); deny when none does."""
    allows = [compile_filter(f) for f in allow]
    denies = [compile_filter(f) for f in deny]

    def match(rec) -> bool:
        if allows and not any(a(rec) for a in allows):
            return False
        return not any(d(rec) for d in denies)
    return match
