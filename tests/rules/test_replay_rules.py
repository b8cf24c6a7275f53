"""`loupe replay --rules` and `loupe rules test` on a capture: alerts beside the events
they are about (same uid and Community ID), the same with shards, errors in one line."""

from __future__ import annotations

import json

import pytest

from sensor import cli
from tests.rules.corpus import CORPUS

pytestmark = pytest.mark.skipif(not CORPUS.is_dir(), reason="WAF corpus not present")


def _run(capsys, *args):
    capsys.readouterr()
    try:
        code = cli.main(list(args))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_replay_writes_alerts_like_suricata_r(capsys, jobs):
    code, out, err = _run(capsys, "replay", str(CORPUS / "lfi.pcap"), "--rules", "default",
                          "--format", "json", "--no-progress", "--jobs", jobs)
    assert code == 0, err
    recs = [json.loads(line) for line in out.splitlines()]
    http = {r["uid"]: r for r in recs if r["type"] == "http"}
    alerts = [r for r in recs if r["type"] == "alert"]
    assert len(http) == 37 and "37 L7 events" in err and f"{len(alerts)} alerts" in err
    lfi = [a for a in alerts if a["rule_id"] == "loupe-lfi"]
    assert {a["uid"] for a in lfi} == set(http)          # every request, by its flow
    for a in lfi:
        assert a["community_id"] == http[a["uid"]]["community_id"]
        assert a["src_port"] == http[a["uid"]]["src_port"]


def test_replay_eve_has_alert_events(capsys):
    code, out, err = _run(capsys, "replay", str(CORPUS / "scanner.pcap"), "--rules", "default",
                          "--format", "eve", "--no-progress")
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    alerts = [e for e in events if e["event_type"] == "alert"]
    assert len(alerts) == 5
    assert {a["alert"]["signature_id"] for a in alerts} == {"loupe-scanner"}


def test_rules_test_command(capsys, tmp_path):
    rules = tmp_path / "r.toml"
    rules.write_text('[[rule]]\nid = "nessus-ua"\naction = "block"\nfield = "header:user-agent"\n'
                     'op = "contains"\nvalue = "nessus"\nnocase = true\n')
    code, out, err = _run(capsys, "rules", "test", str(rules), "--pcap",
                          str(CORPUS / "scanner.pcap"))
    assert code == 0, err
    assert out.count("BLOCK") == 1 and "nessus-ua" in out
    assert "5 L7 events, 1 alerts" in err and "1  nessus-ua (block)" in err


def test_bad_rules_stop_replay_before_reading(capsys, tmp_path):
    rules = tmp_path / "r.toml"
    rules.write_text('[[rule]]\nid = "x"\naction = "alert"\nfield = "path"\nop = "regexp"\n')
    code, out, err = _run(capsys, "replay", str(CORPUS / "scanner.pcap"), "--rules", str(rules))
    assert code != 0 and out == ""
    assert err.strip() == f"loupe: error: {rules}:5: unknown op 'regexp': use equals, prefix, " \
        "suffix, contains, regex, cidr, range, exists, sqli, xss, lfi, rce"
