"""The protocol registry: what the protocol modules declare, and that consumers read it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from sensor import model
from sensor.l7 import http1, registry
from sensor.l7.base import Direction
from sensor.l7.detect import PROTO_TCP, detect, port_hints

ROOT = Path(__file__).resolve().parents[2]


def test_kinds_declare_themselves_once():
    names = registry.kind_names()
    assert names[:3] == ("http", "dns", "tls")
    for spec in registry.kinds():
        assert registry.of_event(spec.event) is spec
        assert registry.kind(spec.name) is spec
        assert spec.parser().name == spec.name  # the parser's app_proto is the kind


def test_a_second_declaration_of_a_name_is_refused():
    spec = registry.kind("http")
    with pytest.raises(ValueError, match="declared twice"):
        registry.Registry.of([spec, dataclasses.replace(spec, event=model.DnsEvent)])
    with pytest.raises(ValueError, match="share the table"):
        registry.Registry.of([spec, dataclasses.replace(registry.kind("dns"), table="http")])


def test_unknown_kind_is_an_error_not_another_kind():
    with pytest.raises(registry.UnknownKind, match="'smtp'"):
        registry.kind("smtp")

    @dataclasses.dataclass(frozen=True)
    class Unregistered:
        x: int = 0

    with pytest.raises(TypeError, match="registered L7 event"):
        model.L7Event(uid="u", ts_ns=1, src_addr="198.18.0.1", dst_addr="198.18.0.2",
                      protocol=6, detail=Unregistered())


def test_kernel_sniffer_takes_its_prefixes_from_the_registry():
    # bpf/flow.c holds no list of its own: the loader compiles the registry's in
    # (tests/kernel/test_sniff_prefixes.py runs it in the real program).
    from sensor.kernel.loader import sniff_prefix_cflag

    text = (ROOT / "bpf" / "flow.c").read_text()
    body = text[text.index("static __always_inline int sniff("):]
    body = body[:body.index("\n}\n")]
    assert "LOUPE_SNIFF_PREFIX(m)" in body and not re.search(r"0x[0-9a-f]{8}", body)
    flag = sniff_prefix_cflag()
    assert flag.startswith("-DLOUPE_SNIFF_PREFIX(m)=")
    words = {int(w, 16) for w in re.findall(r"0x[0-9a-f]{8}", flag)}
    assert words == {int.from_bytes((m + b" ")[:4], "big") for m in http1.KERNEL_METHODS}
    assert set(http1.KERNEL_METHODS) <= http1.METHODS


def test_detection_comes_from_the_registrations():
    hints = port_hints(PROTO_TCP)
    for spec in registry.protocols():
        for port in spec.tcp_ports:
            assert hints[port] == spec.name
    assert http1.looks_like(b"MKCALENDAR /c HTTP/1.1\r\n", Direction.TO_SERVER)
    assert detect(protocol=PROTO_TCP, server_port=1,
                  to_server=b"MKCALENDAR /c HTTP/1.1\r\n") == "http"


def test_storage_columns_are_derived_with_overrides():
    cols = {c.name: c for c in registry.columns(model.DnsEvent,
                                                 registry.kind("dns").column_types)}
    assert cols["rcode"].type == "i32" and cols["latency_ns"].type == "u64"
    assert cols["answers"].type == "list<struct>" and cols["answers"].of is model.DnsAnswer
    assert [(m.name, m.type) for m in cols["answers"].members] == [
        ("name", "str"), ("rtype", "u16"), ("ttl", "u32"), ("data", "str")]
    with pytest.raises(ValueError, match="unknown column types"):
        registry.Protocol(name="x", column_types={"a": "float"})


def test_the_live_engine_takes_its_budget_rules_from_the_registrations():
    # sensor/engine/live.py names no protocol: no string literal in it is a protocol's
    # name, and what it resynchronises, sizes heads by and stops on comes from FramingHints.
    import ast

    from sensor.engine import live

    tree = ast.parse((ROOT / "sensor" / "engine" / "live.py").read_text())
    names = {p.name for p in registry.protocols()}
    literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
                and isinstance(n.value, str)}
    assert not names & literals, sorted(names & literals)
    hints = live._framing_hints()
    assert hints.resync == {"http": http1.MESSAGE_STARTS}
    assert set(hints.done_after) == {"dns"}
    assert hints.head_length(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody", "http") == 27
    assert hints.head_length(b"HTTP/1.1 200 OK\r\nContent-Le", "http") == 1 << 32
    assert hints.head_length(b"$10485760\r\nVVVV", "redis") == 11
    # Each flow by its own protocol's hints: an HTTP head is nothing to a TLS flow.
    assert hints.head_length(b"GET / HTTP/1.1\r\n\r\n", "tls") == 0
    assert hints.head_length(b"$10485760\r\n", "http") == 0
    with pytest.raises(ValueError, match="resync needs message_starts"):
        registry.FramingHints(resync=True)
