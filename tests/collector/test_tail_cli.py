"""`loupe tail` and `loupe query` against a real collector: hubble's --first/--last/--since/
--until, the one output vocabulary (-o/--format/--fields, old spellings as aliases), and
the process and container filters."""

from __future__ import annotations

import csv
import dataclasses
import io
import json

import pytest

from sensor import cli, model
from sensor.export import jsonfmt
from tests.collector.conftest import BASE_NS, batch, flow, http, mixed, push


def loupe(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = cli.main(list(args))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def records(text: str) -> list[model.Record]:
    return [jsonfmt.from_dict(json.loads(line)) for line in text.splitlines()]


def _time(r) -> int:
    return {"flow": lambda: r.flow_end_ns, "lost": lambda: r.interval_end_ns}.get(
        model.record_kind(r), lambda: r.ts_ns)()


@pytest.fixture
def stored(collector):
    # Records from November 2023: far older than any "recent" window.
    recs = mixed(100)
    push(collector.address, [batch(recs[:50], 1), batch(recs[50:], 2)])
    return collector, recs


def test_last_gives_the_newest_records_whatever_their_age(stored, capsys):
    collector, recs = stored
    code, out, err = loupe(capsys, "tail", "--collector", collector.address, "--last", "3",
                           "--format", "json")
    assert code == 0, err
    newest = sorted(recs, key=_time)[-3:]
    assert [r.uid for r in records(out)] == [r.uid for r in newest]
    # With a filter, the newest 3 that match; the default is the newest 20.
    code, out, _ = loupe(capsys, "tail", "--collector", collector.address, "--last", "3",
                         "--type", "dns", "--format", "json")
    assert [r.uid for r in records(out)] == [r.uid for r in recs if r.uid.startswith("D")][-3:]
    code, out, _ = loupe(capsys, "tail", "--collector", collector.address, "--format", "json")
    assert [r.uid for r in records(out)] == [r.uid for r in sorted(recs, key=_time)[-20:]]


def test_first_since_until_select_by_record_time(stored, capsys):
    collector, recs = stored
    code, out, err = loupe(capsys, "tail", "--collector", collector.address, "--first", "2",
                           "--type", "http", "--format", "json")
    assert code == 0, err
    assert [r.uid for r in records(out)] == ["H5", "H6"]
    # [since, until): the records of i = 10..19 by their own time.
    since = jsonfmt.to_dict(recs[10])["start"]
    until = jsonfmt.to_dict(flow(20))["start"]
    code, out, err = loupe(capsys, "tail", "--collector", collector.address, "--since", since,
                           "--until", until, "--format", "json")
    assert code == 0, err
    got = records(out)
    assert got and all(BASE_NS + 10_000 <= _time(r) < BASE_NS + 20_000 for r in got)
    code, _, err = loupe(capsys, "tail", "--collector", collector.address, "--until", "1h", "-f")
    assert code == 2 and err.count("\n") == 1 and "--until" in err


def test_formats_fields_and_old_spellings(stored, capsys):
    collector, _ = stored
    base = ("tail", "--collector", collector.address, "--last", "4", "--type", "http")
    _, new, _ = loupe(capsys, *base, "--format", "json")
    for old in (("-o", "json"), ("--output", "jsonl"), ("--format", "jsonl")):
        _, out, err = loupe(capsys, *base, *old)
        assert out == new, (old, err)
    _, out, _ = loupe(capsys, *base, "--format", "eve")
    eve = [json.loads(line) for line in out.splitlines()]
    assert {e["event_type"] for e in eve} == {"http"} and all("http_method" in e["http"] for e in eve)
    _, out, _ = loupe(capsys, *base, "--format", "zeek")
    assert "#path\thttp" in out and out.count("#fields\t") == 1
    _, out, _ = loupe(capsys, *base, "--fields", "uid,detail.status", "--format", "json")
    assert [list(json.loads(line)) for line in out.splitlines()] == [["uid", "detail.status"]] * 4
    _, out, _ = loupe(capsys, *base, "--format", "table")
    assert all(" http " in line and " -> " in line for line in out.splitlines())
    _, s1, _ = loupe(capsys, *base, "--sensor", "s1", "--format", "json")
    _, s1_new, _ = loupe(capsys, *base, "--sensor-id", "s1", "--format", "json")
    assert s1 == s1_new == new
    code, _, err = loupe(capsys, *base, "--format", "json", "-o", "x.parquet")
    assert code == 2 and "does not fit" in err and err.count("\n") == 1


def test_process_and_container_filters_and_table(collector, capsys):
    curl = model.ProcessInfo(pid=4242, comm="curl", exe="/usr/bin/curl",
                             container_id="a1b2c3d4e5f6" + "0" * 52)
    py = model.ProcessInfo(pid=7, comm="python3", exe="/usr/bin/python3.12")
    recs = [flow(1, process=curl), flow(2, process=py), flow(3), http(4)]
    push(collector.address, [batch(recs, 1)])
    base = ("tail", "--collector", collector.address, "--last", "10")
    for flags, want in ((("--process", "curl"), ["F1"]), (("--process", "python3*"), ["F2"]),
                        (("--container", "A1B2C3D4E5F6"), ["F1"]),
                        (("--not-process", "curl", "--type", "flow"), ["F2", "F3"])):
        _, out, err = loupe(capsys, *base, *flags, "--format", "json")
        assert [r.uid for r in records(out)] == want, (flags, err)
    _, out, _ = loupe(capsys, *base, "--process", "curl", "--format", "table")
    assert "proc=curl[4242]" in out and "ctr=a1b2c3d4e5f6" in out


def test_query_csv_json_and_fields(stored, capsys, tmp_path):
    collector, recs = stored
    sql = "SELECT uid, status, host FROM http ORDER BY uid LIMIT 3"
    code, out, err = loupe(capsys, "query", "--collector", collector.address, sql,
                           "--format", "csv", "--fields", "status,uid")
    assert code == 0, err
    rows = list(csv.reader(io.StringIO(out)))
    want = sorted((r for r in recs if r.uid.startswith("H")), key=lambda r: r.uid)[:3]
    assert rows == [["status", "uid"]] + [[str(r.detail.status), r.uid] for r in want]
    target = tmp_path / "q.csv"
    code, out, _ = loupe(capsys, "query", "--collector", collector.address, sql, "-o", str(target))
    assert code == 0 and out == "" and target.read_text().startswith("uid,status,host\n")
    _, out, _ = loupe(capsys, "query", "--collector", collector.address, sql, "-o", "json")
    assert [json.loads(line)["uid"] for line in out.splitlines()] == [r.uid for r in want]


def test_misspelt_flag_shows_the_subcommands_usage(capsys):
    code, _, err = loupe(capsys, "tail", "--sinse", "1h")
    assert code == 2
    assert err.startswith("usage: loupe tail ") and "unrecognized arguments: --sinse" in err


def test_version(capsys):
    code, out, _ = loupe(capsys, "--version")
    assert code == 0 and out.strip() == f"loupe {cli.version()}" and cli.version()[0].isdigit()
