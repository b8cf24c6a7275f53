"""The records the sensor's own L7 stage and flow table make through model.trusted (no
__post_init__ checks) are the records the validating constructors make: every L7Event, its
detail (and DNS answers) and every Flow (with its l7_coverage) from the golden and corpus
captures is rebuilt through its class's own constructor, which must accept it and give an
equal record of the same shape (repr tells a Counts from a dict, a tuple from a list, a
SummaryMap from a dict and a FlowEndReason from an int)."""

from __future__ import annotations

import dataclasses

import pytest

from sensor import model
from sensor.replay import replay
from tests.replay.test_compiled import captures


def _validated(value):
    """`value` rebuilt through the validating constructors, nested records first."""
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        if type(value) is tuple:
            return tuple(_validated(v) for v in value)
        return value
    return type(value)(**{f.name: _validated(getattr(value, f.name))
                          for f in dataclasses.fields(value)})


def test_trusted_records_equal_validated_records():
    paths = captures()
    assert len(paths) >= 5, paths
    events = coverages = flows = summaries = 0
    kinds: set[str] = set()
    for path in paths:
        for record in replay(path):
            if isinstance(record, model.L7Event):
                events += 1
                kinds.add(record.kind)
            elif isinstance(record, model.Flow):
                flows += 1
                coverages += record.l7_coverage.inspected
                summaries += record.l7_summary is not model.NO_SUMMARY
            else:
                continue
            again = _validated(record)
            assert again == record, path
            assert repr(again) == repr(record), path
            if isinstance(record, model.Flow):
                assert type(record.flow_end_reason) is model.FlowEndReason
                assert list(record.l7_summary) == sorted(record.l7_summary), path
    # The captures reach every trusted builder the stage and the table use.
    assert {"http", "dns", "tls"} <= kinds, kinds
    assert events > 100 and coverages > 50 and flows > 100, (events, coverages, flows)
    assert summaries > 0, summaries


def test_trusted_builder_matches_the_class():
    for cls in (model.L7Event, model.HttpEvent, model.DnsEvent, model.DnsAnswer,
                model.L7Coverage, model.Flow):
        build = model.trusted(cls)
        assert model.trusted(cls) is build
        required = {f.name: "x" for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING}
        if cls is model.L7Event:
            required.update(ts_ns=1, src_addr="192.0.2.1", dst_addr="2001:db8::1",
                            protocol=6, detail=model.HttpEvent())
        elif cls is model.DnsAnswer:
            required.update(rtype=1)
        elif cls is model.Flow:
            required.update(flow_start_ns=1, flow_end_ns=2, src_addr="192.0.2.1",
                            dst_addr="192.0.2.2", protocol=6, ip_version=4)
        made = build(**required)
        assert type(made) is cls
        assert made == cls(**required)
        with pytest.raises(dataclasses.FrozenInstanceError):
            made.__setattr__(dataclasses.fields(cls)[0].name, None)
    # Normalisations are kept: the same shape as the validating constructor's.
    http = model.trusted(model.HttpEvent)(pii={"email.request": 2})
    assert type(http.pii) is model._registry.Counts
    assert model.trusted(model.DnsEvent)(answers=[]).answers == ()
    flow = dict(uid="x", flow_start_ns=1, flow_end_ns=2, src_addr="192.0.2.1",
                dst_addr="2001:db8::1", protocol=17, ip_version=4)
    for extra in ({"l7_summary": {"b": "2", "a": "1"}, "flow_end_reason": 2},
                  {"l7_summary": [("a", "1")]}, {"l7_summary": {}},
                  {"l7_summary": model.SummaryMap([("b", "2"), ("a", "1")])}, {}):
        made, validated = model.trusted(model.Flow)(**flow, **extra), model.Flow(**flow, **extra)
        assert repr(made) == repr(validated), extra
        assert list(made.l7_summary) == list(validated.l7_summary), extra
        assert (made.l7_summary is model.NO_SUMMARY) == (validated.l7_summary is model.NO_SUMMARY)
    # The default factory runs per record, as the class's own does.
    one, two = (model.trusted(model.Flow)(**flow) for _ in range(2))
    assert one.l7_coverage == model.L7Coverage() and one.l7_coverage is not two.l7_coverage
    # A class whose values come from the peer unbounded has no trusted builder.
    with pytest.raises(TypeError):
        model.trusted(model.TlsEvent)
