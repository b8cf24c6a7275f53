"""`loupe rules check` and `loupe rules test`: rule files before they go live."""

from __future__ import annotations

import collections
import sys
from pathlib import Path

from sensor.errors import ConfigError


def register(tree) -> None:
    p = tree.command(
        "rules check", help="check rule files; a problem is named as file:line",
        description=("Load rule files as the sensor would (a file, a directory of *.toml,\n"
                     "or 'default') and report the first problem as FILE:LINE: what is\n"
                     "wrong. Exit status 0 when they are usable, 2 otherwise."))
    p.add_argument("path", metavar="FILE", help="rule file or directory (docs/rules.md)")
    p.set_defaults(func=check)
    p = tree.command(
        "rules test", help="show what rules would fire on a capture",
        description=("Replay a capture with these rules and print every Alert, then the\n"
                     "count per rule (what `loupe replay --rules FILE` writes, alerts only)."))
    p.add_argument("path", metavar="FILE", help="rule file or directory, or 'default'")
    p.add_argument("--pcap", required=True, action="append", type=Path, metavar="FILE",
                   help="capture file (pcap/pcapng); repeat for several")
    p.add_argument("--format", choices=("table", "json", "eve"), default="table",
                   help="alert lines as a table (default), JSON lines or EVE")
    p.set_defaults(func=test)


def check(args) -> int:
    from sensor.rules import loader

    rules = loader.load(args.path)
    groups = sum(1 for r in rules.rules if r.group is not None)
    print(f"{args.path}: {len(rules.rules) - groups} rules, {groups} managed groups, "
          f"default action {rules.default_action}: OK")
    return 0


class _AlertsOut:
    def __init__(self, fmt: str, out) -> None:
        from sensor.export import formats, table

        self.counts: collections.Counter = collections.Counter()
        self.out = out
        self.fmt = fmt
        self.table = table.TableWriter(out) if fmt == "table" else None
        self.formats = formats

    def write(self, record) -> None:
        from sensor.model import Alert

        if not isinstance(record, Alert):
            return
        self.counts[(record.rule_id, record.action)] += 1
        if self.table is not None:
            self.table.write(record)
        elif self.fmt == "json":
            self.out.write(self.formats.json_line(record).decode())
        else:
            import json
            self.out.write(json.dumps(self.formats.eve(record)) + "\n")

    def flush(self) -> None:
        if self.table is not None:
            self.table.flush()
        self.out.flush()

    def close(self) -> None:
        self.flush()


def test(args) -> int:
    from sensor.engine.pipeline import Pipeline, PipelineConfig
    from sensor.replay.reader import CaptureReader
    from sensor.rules import loader

    loader.load(args.path)   # the file:line error before any packet is read
    for pcap in args.pcap:
        if not pcap.is_file():
            raise ConfigError(f"{pcap}: no such capture file")
    out = _AlertsOut(args.format, sys.stdout)
    pipeline = Pipeline(out, PipelineConfig(rules=str(args.path)))
    for pcap in args.pcap:
        with CaptureReader(pcap) as reader:
            pipeline.feed(reader)
    summary = pipeline.close()
    err = sys.stderr
    events = summary.l7_total
    print(f"loupe rules test: {events} L7 events, {summary.alerts} alerts", file=err)
    for (rule, action), n in sorted(out.counts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {n:8}  {rule} ({action})", file=err)
    return 0
