"""The wire edge: sensor.model dataclasses <-> loupe.v1 protobuf messages.

This is the only module that touches protobuf record classes. The dataclasses and the
messages share field names, so the conversion walks dataclass fields; the few nested and
enum fields of Flow are spelled out. L7 details are generic over the registered protocols
(sensor/l7/registry.py): each names its L7Event oneof field and its message, and the event
dataclass's fields map to the message's by name (a tuple of dataclasses to a repeated
message named like the dataclass, a tuple of strings to a repeated string).
"""

from __future__ import annotations

import dataclasses

from sensor import model
from sensor.errors import SchemaError
from sensor.l7 import registry

try:
    from loupe.v1 import ingest_pb2, observer_pb2, records_pb2
except ImportError as exc:  # generated at build time by `make proto`
    raise ImportError(
        "the protobuf code in loupe/v1/ is missing: run `make proto` (or `make install`)"
    ) from exc

__all__ = [
    "ingest_pb2", "observer_pb2", "records_pb2",
    "to_proto", "from_proto", "batch_to_proto", "batch_from_proto",
]


@dataclasses.dataclass(frozen=True, slots=True)
class _Plan:
    """How one registered event dataclass maps to its message."""

    oneof: str
    message: type
    event: type
    scalars: tuple[str, ...]
    strings: tuple[str, ...]                            # tuple[str, ...] fields
    structs: tuple[tuple[str, type, type, tuple[str, ...]], ...]  # (field, class, msg, names)
    counts: tuple[str, ...] = ()                        # Counts fields: map<string, uint32>


_PLANS: dict = {}   # event class and oneof field -> _Plan, filled once per protocol


def _plan(key) -> _Plan | None:
    plan = _PLANS.get(key)
    if plan is None:
        spec = registry.of_event(key) if isinstance(key, type) else \
            registry.registry().by_oneof.get(key)
        if spec is None:
            return None
        cols = registry.columns(spec.event)
        plan = _Plan(
            spec.oneof, getattr(records_pb2, spec.message_name), spec.event,
            tuple(c.name for c in cols if not c.type.startswith("list<") and c.type != "counts"),
            tuple(c.name for c in cols if c.type == "list<str>"),
            tuple((c.name, c.of, getattr(records_pb2, c.of.__name__),
                   tuple(m.name for m in c.members)) for c in cols if c.type == "list<struct>"),
            tuple(c.name for c in cols if c.type == "counts"),
        )
        _PLANS[spec.event] = _PLANS[spec.oneof] = plan
    return plan


def _scalars(obj, skip=()) -> dict:
    return {
        f.name: getattr(obj, f.name)
        for f in dataclasses.fields(obj)
        if f.name not in skip
    }


def _flow_to_proto(flow: model.Flow) -> records_pb2.Flow:
    msg = records_pb2.Flow(**_scalars(flow, skip=("l7_coverage", "process", "flow_end_reason",
                                                  "l7_summary")))
    msg.flow_end_reason = int(flow.flow_end_reason)
    if flow.l7_summary:
        msg.l7_summary.update(flow.l7_summary)
    msg.l7_coverage.CopyFrom(records_pb2.L7Coverage(**_scalars(flow.l7_coverage)))
    if flow.process is not None:
        msg.process.CopyFrom(records_pb2.ProcessInfo(**_scalars(flow.process)))
    return msg


def _l7_to_proto(event: model.L7Event) -> records_pb2.L7Event:
    msg = records_pb2.L7Event(**_scalars(event, skip=("detail",)))
    detail = event.detail
    plan = _plan(type(detail))
    kwargs = {n: getattr(detail, n) for n in plan.scalars}
    for n in plan.strings:
        kwargs[n] = getattr(detail, n)
    for n in plan.counts:
        kwargs[n] = dict(getattr(detail, n))
    for n, _, sub_cls, names in plan.structs:
        kwargs[n] = [sub_cls(**{m: getattr(item, m) for m in names})
                     for item in getattr(detail, n)]
    getattr(msg, plan.oneof).CopyFrom(plan.message(**kwargs))
    return msg


def to_proto(record: model.Record) -> records_pb2.Record:
    """Wrap one model record into a loupe.v1.Record."""
    if isinstance(record, model.Flow):
        return records_pb2.Record(flow=_flow_to_proto(record))
    if isinstance(record, model.L7Event):
        return records_pb2.Record(l7=_l7_to_proto(record))
    if isinstance(record, model.LostEvent):
        return records_pb2.Record(lost=records_pb2.LostEvent(**_scalars(record)))
    if isinstance(record, model.Alert):
        return records_pb2.Record(alert=records_pb2.Alert(**_scalars(record)))
    raise TypeError(f"not a Loupe record: {type(record).__name__}")


def _fields_of(msg, cls) -> dict:
    return {f.name: getattr(msg, f.name) for f in dataclasses.fields(cls)}


def _flow_from_proto(msg) -> model.Flow:
    names = [f.name for f in dataclasses.fields(model.Flow)]
    kwargs = {
        n: getattr(msg, n) for n in names
        if n not in ("l7_coverage", "process", "flow_end_reason", "l7_summary")
    }
    kwargs["l7_summary"] = dict(msg.l7_summary)
    kwargs["flow_end_reason"] = model.FlowEndReason(msg.flow_end_reason)
    kwargs["l7_coverage"] = model.L7Coverage(**_fields_of(msg.l7_coverage, model.L7Coverage))
    if msg.HasField("process"):
        kwargs["process"] = model.ProcessInfo(**_fields_of(msg.process, model.ProcessInfo))
    return model.Flow(**kwargs)


def _l7_from_proto(msg) -> model.L7Event:
    name = msg.WhichOneof("detail")
    if name is None:
        raise SchemaError(f"L7Event without detail ({', '.join(registry.kind_names())})")
    plan = _plan(name)
    if plan is None:
        # A field of this build's records.proto that no registered protocol claims.
        raise SchemaError(f"L7Event of kind {name!r}, which no registered protocol declares")
    sub = getattr(msg, name)
    kwargs = {n: getattr(sub, n) for n in plan.scalars}
    for n in plan.strings:
        kwargs[n] = tuple(getattr(sub, n))
    for n in plan.counts:
        kwargs[n] = getattr(sub, n)   # the model converts the map (registry.Counts)
    for n, cls, _, names in plan.structs:
        kwargs[n] = tuple(cls(**{m: getattr(item, m) for m in names})
                          for item in getattr(sub, n))
    detail = plan.event(**kwargs)
    top = {f.name: getattr(msg, f.name) for f in dataclasses.fields(model.L7Event) if f.name != "detail"}
    top["source"] = top["source"] or "wire"   # senders older than the field
    return model.L7Event(**top, detail=detail)


def from_proto(msg: records_pb2.Record) -> model.Record:
    """Unwrap a loupe.v1.Record. Raises SchemaError on a record that fails validation."""
    kind = msg.WhichOneof("kind")
    try:
        if kind == "flow":
            return _flow_from_proto(msg.flow)
        if kind == "l7":
            return _l7_from_proto(msg.l7)
        if kind == "lost":
            return model.LostEvent(**_fields_of(msg.lost, model.LostEvent))
        if kind == "alert":
            return model.Alert(**_fields_of(msg.alert, model.Alert))
    except (ValueError, TypeError) as exc:
        raise SchemaError(f"invalid {kind} record: {exc}") from None
    raise SchemaError("empty Record (no flow, l7, lost or alert)")


def batch_to_proto(
    records, *, sensor_id: str, batch_id: int, created_ns: int
) -> ingest_pb2.RecordBatch:
    batch = ingest_pb2.RecordBatch(sensor_id=sensor_id, batch_id=batch_id, created_ns=created_ns)
    batch.records.extend(to_proto(r) for r in records)
    return batch


def batch_from_proto(batch: ingest_pb2.RecordBatch) -> list[model.Record]:
    """All records of a batch, or SchemaError naming the first bad one (by index)."""
    out = []
    for i, msg in enumerate(batch.records):
        try:
            out.append(from_proto(msg))
        except SchemaError as exc:
            raise SchemaError(f"record {i}: {exc}") from None
    return out
