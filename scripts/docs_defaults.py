"""Writes the "Defaults" tables of docs/sensor.md and docs/collector.md from the config
schema (sensor/config.py), the one place a default is written.

    .venv/bin/python scripts/docs_defaults.py           # rewrite the tables in place
    .venv/bin/python scripts/docs_defaults.py --check   # exit 1 if a table is stale

A table sits between `<!-- defaults:KIND begin -->` and `<!-- defaults:KIND end -->`;
everything outside the markers is left alone. tests/ops/test_defaults.py holds the docs,
--help and systemd/*.toml to the schema.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from sensor import config

REPO = Path(__file__).resolve().parent.parent
DOCS = {"sensor": REPO / "docs" / "sensor.md", "collector": REPO / "docs" / "collector.md"}


def rows(kind: str) -> list[tuple[str, str]]:
    """(dotted key, default as TOML) for every key, in schema order: the lines of
    `loupe config show` on no file at all."""
    text = config.config_to_toml(config.parse_config(kind, {}, source="defaults"))
    out, section = [], ""
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip("[]") + "."
        elif " = " in line:
            key, _, value = line.partition(" = ")
            out.append((section + key, value))
    return out


def table(kind: str) -> str:
    lines = ["| key | default |", "|---|---|"]
    lines += [f"| `{key}` | `{value}` |" for key, value in rows(kind)]
    return "\n".join(lines) + "\n"


def markers(kind: str) -> re.Pattern:
    return re.compile(rf"(<!-- defaults:{kind} begin -->\n)(.*?)(<!-- defaults:{kind} end -->)",
                      re.S)


def render(kind: str, doc: str) -> str:
    found = markers(kind).search(doc)
    if found is None:
        raise SystemExit(f"{DOCS[kind]}: no <!-- defaults:{kind} begin/end --> markers")
    return doc[:found.start(2)] + table(kind) + doc[found.end(2):]


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for kind, path in DOCS.items():
        doc = path.read_text()
        new = render(kind, doc)
        if new != doc:
            stale.append(path)
            if not check:
                path.write_text(new)
    if check and stale:
        print(f"stale defaults table in {', '.join(map(str, stale))}: run "
              "scripts/docs_defaults.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
