"""Rule files: every problem names its file and line; `loupe rules check` prints one line;
regexes are RE2 (linear time: constructs that need backtracking are refused)."""

from __future__ import annotations

import pytest
import re2

from sensor import cli
from sensor.rules import loader

GOOD = """default_action = "allow"

[[rule]]
id = "r1"
priority = 5
action = "alert"
field = "path"
op = "prefix"
value = "/x"
"""


@pytest.mark.parametrize("text,line,message", [
    ('[[rule]]\nid = "a"\naction = "alert"\nfield = "path"\nop = "prefix"\nvalue = [1,\n',
     6, "TOML"),
    ('[[rule]]\nid = "a"\naction = "drop"\nfield = "path"\n', 3, "action must be"),
    ('[[rule]]\nid = "a"\naction = "alert"\nfield = "paht"\n', 4, "unknown field 'paht'"),
    ('[[rule]]\nid = "a"\naction = "alert"\nfield = "path"\nop = "like"\n', 5, "unknown op"),
    ('[[rule]]\nid = "a"\naction = "alert"\nfield = "path"\nop = "regex"\nvalue = "(a)\\\\1"\n',
     6, "regex on path"),
    ('[[rule]]\nid = "a"\naction = "alert"\nfield = "src"\nop = "cidr"\nvalue = "10.0.0.0/33"\n',
     6, "cidr on src"),
    ('[[rule]]\nid = "a"\naction = "alert"\nfield = "path"\nop = "range"\nvalue = [1, 2]\n',
     6, "not a number"),
    ('[[rule]]\nid = "a"\naction = "alert"\nfield = "path"\nvalue = "/"\n\n[[rule]]\n'
     'id = "a"\naction = "alert"\nfield = "path"\nvalue = "/"\n', 8, "already used"),
    ('\n\n[[rule]]\nid = "a"\naction = "alert"\n', 3, "needs a condition"),
    ('[[rule]]\nid = "a"\naction = "alert"\nfield = "path"\nvalue = "/"\ncolour = "red"\n',
     6, "unknown rule key 'colour'"),
    ('[[group]]\nname = "sqlinjection"\n', 2, "no managed group"),
    ('[[group]]\nname = "sqli"\nmode = "allow"\n', 3, "mode must be"),
    ('[[rule]]\nid = "a"\naction = "alert"\nfield = "status"\nop = "range"\nvalue = [400, 499]\n'
     '[rule.threshold]\ncount = 5\nwindow = "5 minutes"\n', 9, "window is a duration"),
    ('[[rule]]\nid = "a"\naction = "alert"\nfield = "path"\nvalue = "/"\n[rule.threshold]\n'
     'count = 0\n', 7, "count must be"),
    ('default_action = "count"\n', 1, "default_action must be"),
    ('[body]\nmax_bytes = -1\n', 1, "body.max_bytes"),
])
def test_problems_name_file_and_line(tmp_path, text, line, message):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(loader.RuleError) as exc:
        loader.load(f)
    assert str(exc.value).startswith(f"{f}:{line}: "), str(exc.value)
    assert message in str(exc.value)


def test_directory_in_name_order_and_the_default_set(tmp_path):
    (tmp_path / "20-b.toml").write_text(GOOD.replace("r1", "r2"))
    (tmp_path / "10-a.toml").write_text(GOOD)
    (tmp_path / "notes.txt").write_text("not rules")
    rs = loader.load(tmp_path)
    assert [r.id for r in rs.rules] == ["r1", "r2"]
    assert [r.source.rsplit("/", 1)[1] for r in rs.rules] == ["10-a.toml:3", "20-b.toml:3"]
    default = loader.load("default")
    assert {r.id for r in default.rules if r.group is not None} == {
        "loupe-sqli", "loupe-xss", "loupe-lfi", "loupe-rce", "loupe-scanner", "loupe-protocol"}
    assert all(r.action == "alert" for r in default.rules)
    with pytest.raises(loader.RuleError, match="no such rule file"):
        loader.load(tmp_path / "missing")


def test_regexes_are_re2():
    test = loader._compile("path", "regex", "^/a+$", False)
    assert isinstance(loader.re2.compile("a"), type(re2.compile("b")))
    from tests.rules.helpers import event, request
    from sensor.rules.fields import Subject
    from sensor.rules.request import Request
    # A pattern that backtracks exponentially in a backtracking engine: RE2 answers at once.
    slow = loader._compile("path", "regex", "^(a+)+$", False)
    subject = Subject(event(1), Request(*request("GET", "/" + "a" * 3000 + "!")))
    assert slow(subject) is None
    assert test(Subject(event(1), Request(*request("GET", "/aaa")))) is not None
    with pytest.raises(re2.error):
        loader._compile("path", "regex", "(?=lookahead)", False)


def test_rules_check_command(tmp_path, capsys):
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    assert cli.main(["rules", "check", str(good)]) == 0
    assert "1 rules, 0 managed groups" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace('op = "prefix"', 'op = "prefixx"'))
    code = cli.main(["rules", "check", str(bad)])
    err = capsys.readouterr().err
    assert code != 0
    assert err.strip().count("\n") == 0 and f"{bad}:8: unknown op 'prefixx'" in err
