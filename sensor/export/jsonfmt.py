"""Model records <-> JSON-able dicts: the one JSON shape of Loupe records.

Used by the JSON lines sink and by every CLI that prints `--output json`. Field names are
the model's field names, so a JSON line reads like the dataclass and like the collector's
columns. One key is added first, "type": "flow", "lost" or the L7 event's registered
kind ("http", "dns", ...: what sensor.model.record_kind says), so a reader can tell records apart without guessing. After
the model's fields come ISO 8601 companions of the times people read ("start"/"end" of a
flow or loss interval, "ts" of an L7 event; UTC, microseconds, null when unset): the
integer ns fields stay the exact values, the companions are for eyes and jq.

Nested values stay nested (Flow.l7_coverage, Flow.process, L7Event.detail, DNS answers;
Flow.l7_summary is an object, {"mysql_user": "app"}, empty when the protocol gave none);
enums are written as their wire values (flow_end_reason as the IPFIX integer). from_dict
is the exact inverse of to_dict and goes through the model constructors, so a JSON record
that would not make a valid model record raises SchemaError naming the problem.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from sensor import model
from sensor.errors import SchemaError
from sensor.export.formats import COMPANIONS, companions
from sensor.l7 import registry

__all__ = ["to_dict", "from_dict"]


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if type(value) is registry.Counts:
        return dict(value)   # an object: {"card.response": 1}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def to_dict(record: model.Record) -> dict[str, Any]:
    """A dict of JSON types (str, int, bool, None, list, dict) with "type" first."""
    kind = model.record_kind(record)
    out: dict[str, Any] = {"type": kind}
    for f in dataclasses.fields(record):
        out[f.name] = _plain(getattr(record, f.name))
    if kind == "flow":
        out["l7_summary"] = dict(record.l7_summary)   # an object, as the map it is
    out.update(companions(record, kind))
    return out


def _flow(d: dict[str, Any]) -> model.Flow:
    d = dict(d)
    d["l7_coverage"] = model.L7Coverage(**d.get("l7_coverage", {}))
    process = d.get("process")
    d["process"] = None if process is None else model.ProcessInfo(**process)
    return model.Flow(**d)


def _detail(cls: type, data: dict[str, Any]) -> Any:
    """A registered event dataclass from its JSON object: lists back to tuples, a list of
    objects to a tuple of the field's dataclass (registry.columns says which)."""
    data = dict(data)
    for col in registry.columns(cls):
        if col.type == "list<str>" and col.name in data:
            data[col.name] = tuple(data[col.name])
        elif col.type == "list<struct>":
            data[col.name] = tuple(col.of(**item) for item in data.get(col.name, ()))
    return cls(**data)


def _l7(spec: registry.Protocol, d: dict[str, Any]) -> model.L7Event:
    d = dict(d)
    detail = _detail(spec.event, d.pop("detail"))
    return model.L7Event(**d, detail=detail)


def from_dict(data: dict[str, Any]) -> model.Record:
    """Inverse of to_dict. SchemaError on an unknown type or a field the model refuses."""
    if not isinstance(data, dict):
        raise SchemaError(f"a JSON record must be an object, got {type(data).__name__}")
    body = dict(data)
    kind = body.pop("type", None)
    # The ISO companions are derived from the ns fields, which stay authoritative.
    for key, _ in COMPANIONS.get(kind, ()) if isinstance(kind, str) else ():
        body.pop(key, None)
    try:
        if kind == "flow":
            return _flow(body)
        spec = registry.get(kind) if isinstance(kind, str) else None
        if spec is not None and spec.event is not None:
            return _l7(spec, body)
        if kind == "lost":
            return model.LostEvent(**body)
        if kind == "alert":
            return model.Alert(**body)
    except (TypeError, ValueError, KeyError) as exc:
        raise SchemaError(f"invalid {kind} record in JSON: {exc}") from None
    raise SchemaError(
        f"JSON record has type={kind!r}; expected one of flow, "
        f"{', '.join(registry.kind_names())}, lost, alert"
    )
