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

    def __init__(self, base: ParserRegistry, inspect: Callable[[str, str, str], int],
                 on_request: Callable | None = None) -> None:
        self.base = base
        self.inspect = inspect
        self.on_request = on_request

    def create(self, name: str, **options):
        options.setdefault("inspect", self.inspect)
        if self.on_request is not None:
            options.setdefault("on_request", self.on_request)
        return self.base.create(name, **options)

    def __getattr__(self, name: str):
        return getattr(self.base, name)


def build(rules: engine.RuleSet | str, emit: Callable, *,
          registry: ParserRegistry | None = None,
          on_verdict: Callable[[engine.Verdict], None] | None = None,
          current_flow: Callable[[], object | None] | None = None,
          on_pass: Callable[[object], None] | None = None
          ) -> tuple[engine.Analyzer, InspectingRegistry]:
    """(analyzer, registry) for a rule set, or a rule path / "default" to load.
    current_flow (live enforcement): the flow being parsed, which turns on verdicts on
    a request before its response (Analyzer.request_done); on_pass (hold mode) is told
    of every complete request that is not blocked there."""
    ruleset = loader.load(rules) if isinstance(rules, str) else rules
    analyzer = engine.Analyzer(ruleset, emit, on_verdict=on_verdict,
                               current_flow=current_flow, on_pass=on_pass)
    # Through a lambda: a reload swaps analyzer.engine, and new requests follow it.
    early = analyzer.request_done if on_verdict is not None and current_flow is not None \
        else None
    return analyzer, InspectingRegistry(registry or ParserRegistry(),
                                        lambda m, t, c: analyzer.capture(m, t, c), early)
