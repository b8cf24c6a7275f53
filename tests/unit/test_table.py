"""The terminal table and the output flags: names and durations instead of raw numbers,
columns that line up, colour only on a terminal and never with NO_COLOR, lines cut to the
width, and -o/--format resolution with the old spellings."""

from __future__ import annotations

import argparse
import dataclasses
import io

import pytest

from sensor import model
from sensor.errors import ConfigError
from sensor.export.table import TableWriter, duration, use_color
from sensor.output import resolve
from tests.export.records import DNS, FLOW, HTTP, LOST, TLS


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines(*records, **kw) -> list[str]:
    out = io.StringIO()
    w = TableWriter(out, **{"color": False, "width": None, **kw})
    for r in records:
        w.write(r)
    return out.getvalue().splitlines()


@pytest.mark.parametrize("ns,text", [(850_000, "850us"), (2_500_000, "2.5ms"),
                                     (35_000_000, "35ms"), (1_200_000_000, "1.2s"),
                                     (123 * 10**9, "2m03s"), (3720 * 10**9, "1h02m")])
def test_durations_read_like_people_write_them(ns, text):
    assert duration(ns) == text


def test_lines_show_names_not_numbers():
    flow, http, dns, tls, lost = lines(FLOW, HTTP, DNS, TLS, LOST)
    assert flow.startswith("2023-11-14T22:13:21.000Z") and " tcp " in flow
    assert "1.0s" in flow and "proc=curl[42]" in flow and "SF" in flow
    assert "GET example.test/a?x=1 -> 200 OK" in http and "300us" in http
    answers = ",".join(a.data for a in DNS.detail.answers)
    assert f"a.example.test A -> NOERROR {answers}" in dns and " udp " in dns
    assert "TLS 1.3 sni=x.test alpn=h2,http/1.1" in tls
    assert "spool_full count=12" in lost
    nx = dataclasses.replace(DNS, detail=dataclasses.replace(DNS.detail, rcode=3, qtype=28,
                                                             answers=()))
    assert "a.example.test AAAA -> NXDOMAIN" in lines(nx)[0]


def test_columns_line_up_and_container_is_shown():
    ctr = dataclasses.replace(FLOW, process=model.ProcessInfo(pid=1, comm="nginx",
                                                              container_id="ab" * 32))
    a, b, c = lines(HTTP, dataclasses.replace(HTTP, src_port=5), ctr)
    # The destination starts in the same column whatever the source's width.
    assert a.index("198.18.0.2:80") == b.index("198.18.0.2:80") == c.index("198.18.0.2:80")
    assert "ctr=" + "ab" * 6 in c and "ab" * 7 not in c


def test_colour_only_on_a_terminal_and_never_with_no_color(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert use_color(Tty()) and not use_color(io.StringIO())
    assert "\x1b[" in lines(HTTP, color=True)[0]
    monkeypatch.setenv("NO_COLOR", "")
    assert not use_color(Tty())
    out = Tty()
    TableWriter(out, width=None).write(HTTP)
    assert "\x1b[" not in out.getvalue()


def test_lines_are_cut_to_the_width_before_colour():
    [line] = lines(FLOW, color=True, width=60)
    plain = line
    for code in ("\x1b[0m", "\x1b[2m", "\x1b[34m", "\x1b[1m"):
        plain = plain.replace(code, "")
    assert len(plain) == 60 and plain.endswith("…")


def test_fields_make_zeek_cut_columns():
    out = lines(HTTP, DNS, fields=["type", "src_addr", "detail.status"])
    assert out[0].split() == ["type", "src_addr", "detail.status"]
    assert out[1].split() == ["http", "198.18.0.1", "200"]
    assert out[2].split() == ["dns", "fc00::1", "-"]


def _args(**kw):
    return argparse.Namespace(**{"output": None, "format": None, "fields": None, **kw})


def test_output_resolution():
    fmts = ("table", "json", "eve", "zeek")
    assert resolve(_args(), fmts, stdout=Tty()).fmt == "table"
    assert resolve(_args(), fmts, stdout=io.StringIO()).fmt == "json"
    assert resolve(_args(output="x.log"), fmts).fmt == "zeek"
    assert resolve(_args(output="x.jsonl", format="eve"), fmts).fmt == "eve"
    # Old spellings: a format name given to -o; jsonl for json.
    assert resolve(_args(output="json"), fmts, stdout=Tty()) == resolve(
        _args(format="jsonl"), fmts, stdout=Tty())
    for bad, words in ((_args(output="x.parquet", format="json"), "does not fit"),
                       (_args(format="csv"), "not one this command writes"),
                       (_args(output="x.dat"), "cannot tell the format"),
                       (_args(output="json", format="eve"), "disagree"),
                       (_args(format="zeek", fields="uid"), "zeek-cut")):
        with pytest.raises(ConfigError, match=words):
            resolve(bad, fmts)


def test_query_cells_for_people_keep_numbers_that_are_not_codes():
    from sensor.export.table import humanize

    assert humanize("ts_ns", 1_700_000_000_123_456_789) == "2023-11-14T22:13:20.123Z"
    assert humanize("latency_ns", 35_000_000) == "35ms"
    assert humanize("protocol", 17) == "udp" and humanize("rcode", 3) == "NXDOMAIN"
    assert humanize("qtype", 28) == "AAAA" and humanize("version", 0x0304) == "TLS 1.3"
    assert humanize("version", "HTTP/1.1") == "HTTP/1.1" and humanize("status", 503) == "503"
    assert humanize("count_star()", 12) == "12" and humanize("x", None) == "NULL"


def test_primed_columns_line_up_from_the_first_line():
    wide = dataclasses.replace(HTTP, sensor_id="a-much-longer-sensor-name")
    out = io.StringIO()
    w = TableWriter(out, color=False, width=None)
    w.prime([HTTP, wide])
    w.write(HTTP)
    w.write(wide)
    a, b = out.getvalue().splitlines()
    assert a.index(" http ") == b.index(" http ")
