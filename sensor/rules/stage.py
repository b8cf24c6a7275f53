"""The rules stage as the engines use it: an Analyzer for the L7 engine's analyze hook and
a parser registry that asks the HTTP/1 parser to keep raw request heads and body prefixes
(its `inspect` option) for the Analyzer. Replay (sensor/engine/pipeline.py) and the live
sensor (sensor/engine/live.py) call build() the same way."""

from __future__ import annotations

from typing import Callable

from sensor.l7.detect import ParserRegistry
from sensor.rules import engine, loader


class InspectingRegistry:
    """A ParserRegistry whose parsers get `inspect` (only protocols that registered the
    option take it: HTTP/1 today)."""

    def __init__(self, base: ParserRegistry, inspect: Callable[[str, str, str], int]) -> None:
        self.base = base
        self.inspect = inspect

    def create(self, name: str, **options):
        options.setdefault("inspect", self.inspect)
        return self.base.create(name, **options)

    def __getattr__(self, name: str):
        return getattr(self.base, name)


def build(rules: engine.RuleSet | str, emit: Callable, *,
          registry: ParserRegistry | None = None,
          on_verdict: Callable[[engine.Verdict], None] | None = None
          ) -> tuple[engine.Analyzer, InspectingRegistry]:
    """(analyzer, registry) for a rule set, or a rule path / "default" to load."""
    ruleset = loader.load(rules) if isinstance(rules, str) else rules
    analyzer = engine.Analyzer(ruleset, emit, on_verdict=on_verdict)
    # Through a lambda: a reload swaps analyzer.engine, and new requests follow it.
    return analyzer, InspectingRegistry(registry or ParserRegistry(),
                                        lambda m, t, c: analyzer.capture(m, t, c))
