"""Defaults are written once, in the config schema (sensor/config.py). The docs' tables,
the flag tables' "default" statements and every --help that names a config key must say
the same (issue 11: the docs said sniffing was on, the code had it off). The example
files in systemd/ are held to the schema by test_config.py."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib

import pytest

from sensor import config
from sensor.cli import build_parser
from tests.conftest import REPO

DOCS = {"sensor": REPO / "docs" / "sensor.md", "collector": REPO / "docs" / "collector.md"}
COMMANDS = {"sensor": ["sensor", "run"], "collector": ["collector", "run"]}
# What `collector run` does without any config file (docs/collector.md, "Defaults"): the
# one stated exception, and the words that must come with it wherever it is stated.
NO_FILE = "without a config file"


def schema_defaults(kind: str) -> dict[str, object]:
    """Dotted key -> default, as TOML values, from the schema alone."""
    table = tomllib.loads(config.config_to_toml(config.CONFIG_KINDS[kind]()))
    flat: dict[str, object] = {}

    def walk(sub: dict, prefix: str) -> None:
        for key, value in sub.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = value

    walk(table, "")
    return flat


def text_of(value: object) -> str:
    """How a scalar default reads in prose: 127.0.0.1:9464, 32KiB, true."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def squash(text: str) -> str:
    return re.sub(r"[`\s]", "", text)


def sub_parser(kind: str):
    args, _ = build_parser().parse_known_args(COMMANDS[kind])
    return args._parser


def key_of(help_text: str, keys: set[str]) -> str | None:
    """The config key a flag's help names in parentheses: "(spool.dir; default ...)"."""
    found = re.search(r"\(([a-z_]+(?:\.[a-z_]+)?)[;,)]", help_text)
    return found.group(1) if found and found.group(1) in keys else None


@pytest.mark.parametrize("kind", sorted(DOCS))
def test_docs_table_is_the_schema(kind):
    doc = DOCS[kind].read_text()
    found = re.search(rf"<!-- defaults:{kind} begin -->\n(.*?)<!-- defaults:{kind} end -->",
                      doc, re.S)
    assert found, f"{DOCS[kind]}: no defaults table"
    documented = {}
    for row in found.group(1).splitlines()[2:]:
        key, value = re.fullmatch(r"\| `([^`]+)` \| `(.*)` \|", row).groups()
        documented[key] = tomllib.loads(f"v = {value}")["v"]
    assert documented == schema_defaults(kind)
    # ... and in schema order, as `loupe config show` prints it.
    assert list(documented) == list(schema_defaults(kind))


def test_generator_agrees():
    done = subprocess.run([sys.executable, "scripts/docs_defaults.py", "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("kind", sorted(COMMANDS))
def test_help_states_the_schema_default(kind):
    defaults = schema_defaults(kind)
    checked = 0
    for action in sub_parser(kind)._actions:
        text = " ".join((action.help or "").split())
        key = key_of(text, set(defaults))
        if key is None or "default" not in text:
            continue
        want = text_of(defaults[key])
        if isinstance(defaults[key], list) or want == "":
            continue
        checked += 1
        assert want in text, f"{action.option_strings}: help does not state {key} = {want}"
        for stated in re.findall(r"default:? ([^;,)]+)", text):
            assert stated.strip() in (want, f"{want} with a config file") or NO_FILE in stated, (
                f"{action.option_strings}: help says default {stated!r}, the schema {want!r}")
    assert checked >= 3   # the test looked at something


def test_select_help_states_the_default_selection():
    sel = config.SelectionConfig()
    text = " ".join(next(a.help for a in sub_parser("sensor")._actions
                         if "--select" in a.option_strings).split())
    stated = re.search(r"default: (\S+)", text).group(1).split(",")
    assert ("sniff" in stated) == sel.sniff
    assert sorted(int(r[5:]) for r in stated if r.startswith("port:")) == sorted(sel.ports)


def test_sensor_flag_table_defaults():
    # docs/sensor.md: | flag | config key | meaning ... (default X) |
    defaults = schema_defaults("sensor")
    checked = 0
    for row in DOCS["sensor"].read_text().splitlines():
        cells = [c.strip() for c in row.strip("|").split("|")]
        if len(cells) != 3 or not re.fullmatch(r"`[a-z_.]+`", cells[1]):
            continue
        key = cells[1].strip("`")
        stated = re.search(r"\(default ([^,;)]+)", cells[2])
        if key not in defaults or stated is None:
            continue
        checked += 1
        assert squash(stated.group(1)) == squash(text_of(defaults[key])), row
    assert checked >= 3


def test_collector_flag_table_defaults():
    # docs/collector.md: | flag | default | meaning |, the key from the flag's own help.
    defaults = schema_defaults("collector")
    helps = {s: " ".join((a.help or "").split()) for a in sub_parser("collector")._actions
             for s in a.option_strings}
    checked = 0
    for row in DOCS["collector"].read_text().splitlines():
        flag = re.match(r"\| `(--[a-z-]+)", row)
        if flag is None or flag.group(1) not in helps:
            continue
        key = key_of(helps[flag.group(1)], set(defaults))
        if key is None or isinstance(defaults[key], (bool, list)):
            continue
        cell = row.strip("|").split("|")[1]
        checked += 1
        assert squash(cell) == squash(text_of(defaults[key])) or (
            NO_FILE in cell and f"`{key}`" in cell), row
    assert checked >= 3


def _all_parsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield sub
                yield from _all_parsers(sub)


def test_every_command_states_the_same_addresses():
    # Analyst commands and `loupe status` address the daemons at their schema defaults.
    want = {"--collector": config.CollectorConfig().listen,
            "--sensor-metrics": config.MetricsConfig().listen}
    checked = set()
    for sub in _all_parsers(build_parser()):
        for action in sub._actions:
            flag = next((o for o in action.option_strings if o in want), None)
            text = " ".join((action.help or "").split())
            stated = re.search(r"default:? ([^;,)\s]+)", text)
            if flag is None or stated is None:
                continue
            checked.add(sub.prog)
            assert stated.group(1) == want[flag], f"{sub.prog} {flag}: {text}"
    assert {"loupe tail", "loupe status", "loupe sensor run"} <= checked
