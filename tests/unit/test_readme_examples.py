"""Every `loupe tail` example in the README and docs/collector.md parses, and its filter,
built and compiled by the real code (the CLI's request builder, the collector's filter
compiler), matches a record it was written for. An example that can never match (an HTTP
criterion ANDed with a DNS one) fails here."""

from __future__ import annotations

import shlex
import time

import pytest

from collector import cli as collector_cli
from collector import filters
from sensor import cli, model
from sensor.export import wire
from tests.conftest import REPO

DOCS = [REPO / "README.md", REPO / "docs" / "collector.md"]

PROCESS = model.ProcessInfo(pid=9, comm="curl", exe="/usr/bin/curl",
                            container_id="a1b2c3d4e5f6" + "0" * 52)


def _l7(detail, **kw) -> model.L7Event:
    base = dict(uid="C1", ts_ns=time.time_ns(), src_addr="198.18.0.5", dst_addr="198.19.0.80",
                src_port=40000, dst_port=443, protocol=6)
    base.update(kw)
    return model.L7Event(**base, detail=detail)


# Records an analyst following the examples is looking for.
POOL = [
    _l7(model.HttpEvent(method="GET", host="www.example.com", path="/api", status=503)),
    _l7(model.DnsEvent(qname="nope.example.com", qtype=1, rcode=3), dst_port=53, protocol=17),
    _l7(model.TlsEvent(version=0x0304, sni="login.bank.test"), src_addr="198.18.0.7"),
    model.Flow(uid="C2", flow_start_ns=1, flow_end_ns=2, src_addr="198.18.0.5",
               dst_addr="198.19.0.80", src_port=40001, dst_port=443, protocol=6,
               ip_version=4, process=PROCESS),
    model.Flow(uid="C3", flow_start_ns=1, flow_end_ns=2, src_addr="198.18.0.5",
               dst_addr="198.19.0.90", src_port=40002, dst_port=9092, protocol=6,
               ip_version=4, app_proto="kafka", l7_summary={"kafka_topic": "orders.eu"}),
]


def tail_examples() -> list[tuple[str, list[str]]]:
    found = []
    for doc in DOCS:
        in_sh = False
        for line in doc.read_text().splitlines():
            if line.startswith("```"):
                in_sh = line.strip() == "```sh"
                continue
            if in_sh and line.startswith("loupe tail"):
                found.append((f"{doc.name}: {line}", shlex.split(line, comments=True)[2:]))
    return found


def test_the_docs_have_tail_examples():
    assert len(tail_examples()) >= 6


@pytest.mark.parametrize("where,argv", tail_examples(), ids=lambda x: str(x)[:60])
def test_tail_example_matches_a_record(where, argv):
    args = cli.parse(cli.build_parser(["collector.cli"]), ["tail", *argv])
    req = collector_cli.build_subscribe_request(args, time.time_ns())
    match = filters.compile_lists(req.allow, req.deny)
    assert any(match(wire.to_proto(r)) for r in POOL), f"{where} can never match"


def test_the_old_headline_example_is_what_this_catches():
    argv = ["-f", "--to-port", "443", "--http-status", "500+", "--dns-qname", "*.example.com"]
    args = cli.parse(cli.build_parser(["collector.cli"]), ["tail", *argv])
    req = collector_cli.build_subscribe_request(args, time.time_ns())
    match = filters.compile_lists(req.allow, req.deny)
    assert not any(match(wire.to_proto(r)) for r in POOL)
