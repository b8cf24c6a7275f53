"""The records the sensor's own L7 stage makes through model.trusted (no __post_init__
checks) are the records the validating constructors make: every L7Event, its detail (and
DNS answers) and every Flow's l7_coverage from the golden and corpus captures is rebuilt
through its class's own constructor, which must accept it and give an equal record of the
same shape (repr tells a Counts from a dict and a tuple from a list)."""

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
    events = coverages = 0
    kinds: set[str] = set()
    for path in paths:
        for record in replay(path):
            if isinstance(record, model.L7Event):
                events += 1
                kinds.add(record.kind)
            elif isinstance(record, model.Flow):
                if not record.l7_coverage.inspected:
                    continue
                coverages += 1
                record = record.l7_coverage
            else:
                continue
            again = _validated(record)
            assert again == record, path
            assert repr(again) == repr(record), path
    # The captures reach every trusted builder the stage uses.
    assert {"http", "dns", "tls"} <= kinds, kinds
    assert events > 100 and coverages > 50, (events, coverages)


def test_trusted_builder_matches_the_class():
    for cls in (model.L7Event, model.HttpEvent, model.DnsEvent, model.DnsAnswer,
                model.L7Coverage):
        build = model.trusted(cls)
        assert model.trusted(cls) is build
        required = {f.name: "x" for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING}
        if cls is model.L7Event:
            required.update(ts_ns=1, src_addr="192.0.2.1", dst_addr="2001:db8::1",
                            protocol=6, detail=model.HttpEvent())
        elif cls is model.DnsAnswer:
            required.update(rtype=1)
        made = build(**required)
        assert type(made) is cls
        assert made == cls(**required)
        with pytest.raises(dataclasses.FrozenInstanceError):
            made.__setattr__(dataclasses.fields(cls)[0].name, None)
    # Normalisations are kept: the same shape as the validating constructor's.
    http = model.trusted(model.HttpEvent)(pii={"email.request": 2})
    assert type(http.pii) is model._registry.Counts
    assert model.trusted(model.DnsEvent)(answers=[]).answers == ()
    # A class whose __post_init__ does more than check, or whose values come from the
    # peer unbounded, has no trusted builder.
    for cls in (model.Flow, model.TlsEvent):
        with pytest.raises(TypeError):
            model.trusted(cls)
