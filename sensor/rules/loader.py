"""Rule files: TOML in a directory (default /etc/loupe/rules.d/, every *.toml in name
order) or one file, to a RuleSet. Every problem names its file and line.

    default_action = "allow"          # optional, once: allow or block
    [body]                            # optional, once: request bodies inspected
    max_bytes = 8192
    paths = ["/"]                     # path prefixes whose form/JSON bodies are captured

    [[group]]                         # a managed group (sensor/rules/managed.py)
    name = "sqli"                     # sqli xss lfi rce scanner protocol
    mode = "block"                    # count, alert or block
    priority = 100
    block_source_ttl = "10m"          # optional, block only: ban the source too (live)

    [[rule]]
    id = "admin-from-outside"
    priority = 10
    action = "block"                  # count, alert, allow or block
    severity = "high"                 # low medium high critical
    category = "access"
    match = [ { field = "path", op = "prefix", value = "/admin" },
              { field = "src", op = "cidr", value = ["10.0.0.0/8"], negate = true } ]
    # or one condition inline: field = "path", op = "prefix", value = "/admin"
    [rule.threshold]                  # optional: count per key and window
    count = 10
    window = "60s"
    by = "src"                        # src, endpoint, src+endpoint, src+template
    distinct = "id"                   # optional: distinct ids on the templated path

Operators: equals, prefix, suffix, contains, regex, cidr, range ([low, high]), exists,
and the detectors sqli, xss, lfi, rce (on the field's decoded values). Values may be one
string or a list (any of them). `nocase = true` folds case for the text operators.

Regexes are compiled with RE2 (google-re2: linear time, no backreferences or lookaround,
so no catastrophic backtracking) and are bounded to MAX_REGEX characters.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path

import re2

from sensor.errors import ConfigError
from sensor.model import ALERT_ACTIONS, SEVERITIES
from sensor.rules import decode, engine, fields, managed, shell, sqli, web

DEFAULT_DIR = Path("/etc/loupe/rules.d")
DEFAULT_RULES = Path(__file__).with_name("default.toml")
MAX_REGEX = 1024
MAX_RULES = 4096      # per rule set: evaluation is linear in it
MAX_BODY = 1 << 20

_DETECTORS = {"sqli": sqli.detect, "xss": web.xss, "lfi": web.traversal, "rce": shell.detect}
_TEXT_OPS = ("equals", "prefix", "suffix", "contains", "regex")
_OPS = (*_TEXT_OPS, "cidr", "range", "exists", *_DETECTORS)
# Relative cost of an operator's test: conditions run cheapest first.
_COST = {"exists": 0, "equals": 1, "prefix": 1, "suffix": 1, "range": 1, "contains": 2,
         "cidr": 3, "regex": 4, **{d: 9 for d in _DETECTORS}}
_RULE_KEYS = frozenset(("id", "priority", "action", "severity", "category", "match", "field",
                        "op", "value", "negate", "nocase", "threshold", "log",
                        "block_source_ttl"))
_COND_KEYS = frozenset(("field", "op", "value", "negate", "nocase"))
_GROUP_KEYS = frozenset(("name", "mode", "priority", "id", "severity", "block_source_ttl"))
# A source ban is a mitigation with an end (docs/rules.md, "Enforcement"): 1 s .. 1 day.
MAX_BLOCK_SOURCE_TTL_NS = 24 * 3600 * 10**9
_DURATION = re.compile(r"^(\d+)\s*(ms|s|m|h)?$")


class RuleError(ConfigError):
    """A rule file that cannot be used: the message starts with file:line."""


class _Where:
    """Line numbers of a TOML file's [[rule]] / [[group]] blocks and their keys (tomllib
    keeps none), so an error can name the line a person has to fix."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()
        self.blocks: dict[str, list[int]] = {"rule": [], "group": []}
        for n, line in enumerate(self.lines, 1):
            m = re.match(r"\s*\[\[\s*(rule|group)\s*\]\]", line)
            if m:
                self.blocks[m.group(1)].append(n)

    def line(self, kind: str, index: int, key: str = "") -> int:
        starts = self.blocks.get(kind, [])
        if index >= len(starts):
            return 1
        start = starts[index]
        if not key:
            return start
        end = starts[index + 1] if index + 1 < len(starts) else len(self.lines) + 1
        other = [b for k, bs in self.blocks.items() if k != kind for b in bs if b > start]
        end = min([end, *other])
        pattern = re.compile(rf"^\s*{re.escape(key)}\s*=|[{{,]\s*{re.escape(key)}\s*=")
        for n in range(start, end):
            if pattern.search(self.lines[n - 1]):
                return n
        return start

    def fail(self, line: int, message: str) -> RuleError:
        return RuleError(f"{self.path}:{line}: {message}")


def rule_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.glob("*.toml") if p.is_file())
    if path.is_file():
        return [path]
    raise RuleError(f"{path}: no such rule file or directory (make it, or name another "
                    "with --rules)")


def load(path: Path | str) -> engine.RuleSet:
    """Every rule file under path (a directory or one file, or "default") as one RuleSet."""
    if str(path) == "default":
        path = DEFAULT_RULES
    path = Path(path)
    rules: list[engine.Rule] = []
    default_action = ""
    body: dict | None = None
    seen: dict[str, str] = {}
    for f in rule_files(path):
        doc, where = _read(f)
        part = _parse(doc, where, len(rules), seen)
        rules += part[0]
        if part[1]:
            if default_action and default_action != part[1]:
                raise where.fail(1, f"default_action {part[1]!r} contradicts another file's "
                                    f"{default_action!r}")
            default_action = part[1]
        if part[2] is not None:
            body = part[2]
    if len(rules) > MAX_RULES:
        raise RuleError(f"{path}: {len(rules)} rules; at most {MAX_RULES} are allowed")
    body = body or {}
    return engine.RuleSet(tuple(rules), default_action or "allow",
                          body.get("max_bytes", 8192), tuple(body.get("paths", ("/",))))


def _read(f: Path) -> tuple[dict, _Where]:
    try:
        text = f.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleError(f"{f}: cannot read: {exc}") from None
    where = _Where(f, text)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        # "at end of document": the last line is where the unfinished value starts or ends.
        line = m.group(1) if m else str(max(len(text.splitlines()), 1))
        msg = re.sub(r"\s*\(at (?:line \d+, column \d+|end of document)\)", "", str(exc))
        raise RuleError(f"{f}:{line}: TOML: {msg}") from None
    return doc, where


def _parse(doc: dict, where: _Where, offset: int, seen: dict[str, str]):
    unknown = set(doc) - {"rule", "group", "default_action", "body"}
    if unknown:
        key = sorted(unknown)[0]
        raise where.fail(_key_line(where, key), f"unknown key {key!r} (rule, group, "
                                                "default_action, body)")
    default_action = doc.get("default_action", "")
    if default_action and default_action not in engine.TERMINAL:
        raise where.fail(_key_line(where, "default_action"),
                         f"default_action must be allow or block, not {default_action!r}")
    body = doc.get("body")
    if body is not None:
        body = _body(body, where)
    rules: list[engine.Rule] = []
    for i, g in enumerate(_tables(doc.get("group", []), where, "group")):
        rules.append(_group(g, i, where, offset + len(rules), seen))
    for i, r in enumerate(_tables(doc.get("rule", []), where, "rule")):
        rules.append(_rule(r, i, where, offset + len(rules), seen))
    return rules, default_action, body


def _key_line(where: _Where, key: str) -> int:
    for n, line in enumerate(where.lines, 1):
        if re.match(rf"\s*\[?{re.escape(key)}\b", line):
            return n
    return 1


def _tables(value, where: _Where, kind: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise where.fail(_key_line(where, kind), f"{kind} must be [[{kind}]] tables")
    return value


def _body(body, where: _Where) -> dict:
    line = _key_line(where, "body")
    if not isinstance(body, dict) or set(body) - {"max_bytes", "paths"}:
        raise where.fail(line, "[body] takes max_bytes and paths")
    n = body.get("max_bytes", 8192)
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_BODY:
        raise where.fail(line, f"body.max_bytes must be 0..{MAX_BODY}")
    paths = body.get("paths", ["/"])
    if not isinstance(paths, list) or not all(isinstance(p, str) and p.startswith("/")
                                              for p in paths):
        raise where.fail(line, "body.paths must be a list of path prefixes starting with /")
    return {"max_bytes": n, "paths": paths}


def _common(t: dict, i: int, where: _Where, kind: str, seen: dict[str, str]):
    rid = t.get("id", t.get("name") if kind == "group" else None)
    if not isinstance(rid, str) or not re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", rid or ""):
        raise where.fail(where.line(kind, i, "id"),
                         "id must be 1-64 letters, digits, '.', '_', ':' or '-'")
    if kind == "group":
        rid = "loupe-" + rid if "id" not in t else rid
    here = f"{where.path}:{where.line(kind, i)}"
    if rid in seen:
        raise where.fail(where.line(kind, i, "id"), f"id {rid!r} is already used at {seen[rid]}")
    seen[rid] = here
    prio = t.get("priority", 1000)
    if not isinstance(prio, int) or isinstance(prio, bool) or not 0 <= prio <= 1_000_000:
        raise where.fail(where.line(kind, i, "priority"), "priority must be 0..1000000")
    sev = t.get("severity", "")
    if sev and sev not in SEVERITIES:
        raise where.fail(where.line(kind, i, "severity"),
                         f"severity must be one of {', '.join(SEVERITIES)}")
    return rid, prio, sev, here


def _group(t: dict, i: int, where: _Where, order: int, seen) -> engine.Rule:
    bad = set(t) - _GROUP_KEYS
    if bad:
        key = sorted(bad)[0]
        raise where.fail(where.line("group", i, key), f"unknown group key {key!r}")
    name = t.get("name")
    if name not in managed.GROUPS:
        raise where.fail(where.line("group", i, "name"),
                         f"no managed group {name!r}: use {', '.join(managed.GROUPS)}")
    mode = t.get("mode", "count")
    if mode not in ("count", "alert", "block"):
        raise where.fail(where.line("group", i, "mode"), "mode must be count, alert or block")
    rid, prio, sev, here = _common(t, i, where, "group", seen)
    g = managed.GROUPS[name]
    return engine.Rule(id=rid, priority=prio, action=mode, severity=sev or g.severity,
                       category=g.category, group=g, order=order, source=here,
                       block_source_ttl_ns=_source_ttl(t, i, where, "group", mode))


def _rule(t: dict, i: int, where: _Where, order: int, seen) -> engine.Rule:
    bad = set(t) - _RULE_KEYS
    if bad:
        key = sorted(bad)[0]
        raise where.fail(where.line("rule", i, key), f"unknown rule key {key!r}")
    rid, prio, sev, here = _common(t, i, where, "rule", seen)
    action = t.get("action")
    if action not in ALERT_ACTIONS:
        raise where.fail(where.line("rule", i, "action"),
                         f"action must be one of {', '.join(ALERT_ACTIONS)}")
    if "match" in t and "field" in t:
        raise where.fail(where.line("rule", i, "field"), "use either match = [...] or one "
                                                          "inline field/op/value, not both")
    specs = t.get("match") if "match" in t else [
        {k: t[k] for k in _COND_KEYS if k in t}] if "field" in t else []
    if not isinstance(specs, list) or not specs:
        raise where.fail(where.line("rule", i), "a rule needs a condition: match = [...] or "
                                                "field/op/value")
    conds = tuple(_condition(c, i, where) for c in specs)
    threshold = None
    if "threshold" in t:
        threshold = _threshold(t["threshold"], i, where)
    # An allow decides silently unless asked (allow-lists are hot paths: health checks).
    log = t.get("log", action != "allow")
    if not isinstance(log, bool):
        raise where.fail(where.line("rule", i, "log"), "log must be true or false")
    cost = [_COST.get(c.get("op", "equals"), 1) for c in specs]
    cheap_first = tuple(sorted(range(len(conds)), key=lambda j: cost[j]))
    return engine.Rule(id=rid, priority=prio, action=action, conditions=conds,
                       severity=sev or "medium", category=t.get("category", "custom"),
                       threshold=threshold, log=log, order=order, source=here,
                       cheap_first=cheap_first,
                       block_source_ttl_ns=_source_ttl(t, i, where, "rule", action))


def _duration_ns(text) -> int | None:
    m = _DURATION.match(str(text))
    if not m:
        return None
    unit = {"ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9, None: 10**9}
    return int(m.group(1)) * unit[m.group(2)]


def _source_ttl(t: dict, i: int, where: _Where, kind: str, action: str) -> int:
    """block_source_ttl = "10m": a block also bans the event's source for that long."""
    if "block_source_ttl" not in t:
        return 0
    line = where.line(kind, i, "block_source_ttl")
    if action != "block":
        raise where.fail(line, f"block_source_ttl needs {'mode' if kind == 'group' else 'action'}"
                               " = \"block\"")
    ttl = _duration_ns(t["block_source_ttl"])
    if ttl is None or not 10**9 <= ttl <= MAX_BLOCK_SOURCE_TTL_NS:
        raise where.fail(line, "block_source_ttl is a duration from 1s to 24h: 30s, 10m, 1h")
    return ttl


def _condition(c, i: int, where: _Where) -> engine.Condition:
    if not isinstance(c, dict):
        raise where.fail(where.line("rule", i, "match"), "each match entry is a table "
                                                          "{ field = ..., op = ..., value = ... }")
    bad = set(c) - _COND_KEYS
    if bad:
        key = sorted(bad)[0]
        raise where.fail(where.line("rule", i, key), f"unknown condition key {key!r}")
    name = c.get("field")
    if not isinstance(name, str) or not fields.known(name):
        raise where.fail(where.line("rule", i, "field"),
                         f"unknown field {name!r}: use {', '.join(sorted(fields.FIXED))}, "
                         "arg:NAME, header:NAME, cookie:NAME, body:NAME or detail.NAME")
    op = c.get("op", "equals")
    if op not in _OPS:
        raise where.fail(where.line("rule", i, "op"), f"unknown op {op!r}: use "
                                                       f"{', '.join(_OPS)}")
    value = c.get("value")
    line = where.line("rule", i, "value")
    try:
        test = _compile(name, op, value, bool(c.get("nocase", False)))
    except (ValueError, TypeError, re2.error) as exc:
        text = exc.args[0] if exc.args else str(exc)
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
        raise where.fail(line, f"{op} on {name}: {text}") from None
    negate = c.get("negate", False)
    if not isinstance(negate, bool):
        raise where.fail(where.line("rule", i, "negate"), "negate must be true or false")
    return engine.Condition(name, test, negate)


def _texts(value) -> list[str]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) for v in values):
        raise ValueError("value must be a string or a list of strings")
    return values


def _compile(name: str, op: str, value, nocase: bool):
    """The test of one condition: subject -> (field, value, reason) of the first
    matching value, or None."""
    get = fields.getter(name)
    if op == "exists":
        return lambda s: next(((f, str(v), "present") for f, v in get(s)), None)
    if op in _DETECTORS:
        if value is not None:
            raise ValueError("a detector takes no value")
        detect = _DETECTORS[op]

        def run(s):
            for f, v in get(s):
                for form in decode.variants(str(v)):
                    why = detect(form)
                    if why:
                        return f, form, why
            return None
        return run
    if op == "range":
        if (not isinstance(value, list) or len(value) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
                or value[0] > value[1]):
            raise ValueError("value must be [low, high], numbers, low <= high")
        if name not in fields.NUMERIC and not name.startswith(("detail.", "pii.")):
            raise ValueError(f"{name} is not a number (range works on "
                             f"{', '.join(sorted(fields.NUMERIC))}, detail.NAME)")
        lo, hi = value
        return lambda s: next(((f, str(v), f"{v} in [{lo}, {hi}]") for f, v in get(s)
                               if isinstance(v, (int, float)) and lo <= v <= hi), None)
    if op == "cidr":
        nets = [ipaddress.ip_network(v, strict=False) for v in _texts(value)]

        def in_nets(s):
            for f, v in get(s):
                try:
                    ip = ipaddress.ip_address(str(v).split(",")[0].strip())
                except ValueError:
                    continue
                if any(ip.version == n.version and ip in n for n in nets):
                    return f, str(v), "in " + ", ".join(map(str, nets))
            return None
        return in_nets
    texts = _texts(value)
    if op == "regex":
        for t in texts:
            if len(t) > MAX_REGEX:
                raise ValueError(f"regex longer than {MAX_REGEX} characters")
        options = re2.Options()
        options.case_sensitive = not nocase
        options.max_mem = 8 << 20   # bounds the automaton per rule
        options.log_errors = False
        rx = [re2.compile(t, options) for t in texts]

        def search(s):
            for f, v in get(s):
                text = str(v)[:decode.MAX_VALUE]
                for r in rx:
                    if r.search(text):
                        return f, text, f"matches {r.pattern}"
            return None
        return search
    want = [t.lower() for t in texts] if nocase else texts
    pred = {
        "equals": lambda v: v in want,
        "prefix": lambda v: v.startswith(tuple(want)),
        "suffix": lambda v: v.endswith(tuple(want)),
        "contains": lambda v: any(w in v for w in want),
    }[op]

    def text_test(s):
        for f, v in get(s):
            text = str(v)
            if pred(text.lower() if nocase else text):
                return f, text, f"{op} {texts[0]!r}" + (" ..." if len(texts) > 1 else "")
        return None
    return text_test


def _threshold(t, i: int, where: _Where) -> engine.Threshold:
    line = where.line("rule", i, "count")
    if not isinstance(t, dict) or set(t) - {"count", "window", "by", "distinct"}:
        raise where.fail(line, "threshold takes count, window, by and distinct")
    count = t.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 1_000_000:
        raise where.fail(line, "threshold count must be 1..1000000")
    window = t.get("window", "60s")
    m = _DURATION.match(str(window))
    if not m:
        raise where.fail(where.line("rule", i, "window"), "window is a duration: 30s, 5m, 1h")
    unit = {"ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9, None: 10**9}
    window_ns = int(m.group(1)) * unit[m.group(2)]
    if not 10**9 <= window_ns <= 24 * 3600 * 10**9:
        raise where.fail(where.line("rule", i, "window"), "window must be 1s..24h")
    by = t.get("by", "src")
    if by not in ("src", "endpoint", "src+endpoint", "src+template"):
        raise where.fail(where.line("rule", i, "by"),
                         "by must be src, endpoint, src+endpoint or src+template")
    distinct = t.get("distinct", "")
    if distinct not in ("", "id"):
        raise where.fail(where.line("rule", i, "distinct"), 'distinct must be "id"')
    return engine.Threshold(count=count, window_ns=window_ns, by=by, distinct=distinct)
