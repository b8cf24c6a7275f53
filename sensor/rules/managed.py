"""Managed rule groups: the built-in detectors, switched on by name, each in a mode.

A group runs its detector over every user-controlled input of a request (request.py:
path, query argument names and values, cookies, form and JSON body values, the headers
attackers write into), each under every decoding the application may apply
(decode.variants). The first hit is the group's finding; one request gives at most one
finding per group.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable
from urllib.parse import unquote

from sensor.rules import decode, shell, sqli, web
from sensor.rules.request import Request


@dataclass(frozen=True, slots=True)
class Finding:
    group: str
    field: str      # where: "arg:id", "path", "header:user-agent", ...
    value: str      # the (decoded) value that matched, unredacted: alerts.py bounds it
    reason: str


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    category: str
    severity: str
    # scan(request, value detectors the rule set runs): its finding, or None. The
    # second argument lets one pass over the inputs serve every enabled group.
    scan: Callable[..., Finding | None]


# Detectors that judge every input value, with the inputs each skips: the path is judged
# by the lfi group's own path check, and SQL or shell syntax in a path is not an injection
# the application will run.
VALUE_DETECTORS: dict[str, tuple[Callable[[str], str], tuple[str, ...]]] = {}

# Values up to this long are judged once and remembered: real traffic repeats most of them
# (user agents, referers, cookie names, page=1), and a detector is a pure function of the
# text. 8192 entries of at most 256 characters: a few MiB.
_CACHED_LEN = 256


@lru_cache(maxsize=8192)
def _judge_cached(names: tuple[str, ...], value: str) -> tuple:
    return _judge(names, value)


def _judge(names: tuple[str, ...], value: str) -> tuple:
    """Per detector in `names`: (the decoded form, why) of the first decoding it flags,
    or None. The decodings are made once for all of them."""
    forms = decode.variants(value)
    out = []
    for name in names:
        detect = VALUE_DETECTORS[name][0]
        hit = None
        for form in forms:
            why = detect(form)
            if why:
                hit = (form, why)
                break
        out.append(hit)
    return tuple(out)


def findings(req: Request, names: tuple[str, ...]) -> dict[str, Finding]:
    """The first finding of each value detector in `names` over the request's inputs, in
    one pass (made once per request and rule set: every group reads the same dict)."""
    cached = req.findings
    if cached is not None and cached[0] == names:
        return cached[1]
    out: dict[str, Finding] = {}
    # The path is skipped by most detectors: judge it only by those that read it.
    path_names = tuple(n for n in names if "path" not in VALUE_DETECTORS[n][1])
    for field, value in req.inputs():
        if not value:
            continue
        wanted = path_names if field == "path" else names
        if not wanted:
            continue
        hits = _judge_cached(wanted, value) if len(value) <= _CACHED_LEN else \
            _judge(wanted, value)
        for name, hit in zip(wanted, hits):
            if hit is not None and name not in out:
                out[name] = Finding(name, field, hit[0], hit[1])
    req.findings = (names, out)
    return out


def _sql_or_nosql(value: str) -> str:
    return sqli.detect(value) or sqli.nosql_name(value)


VALUE_DETECTORS.update(
    sqli=(_sql_or_nosql, ("path",)), xss=(web.xss, ()), lfi=(web.traversal, ("path",)),
    rce=(shell.detect, ("path",)))


def _value_group(name: str) -> Callable[[Request, tuple[str, ...]], Finding | None]:
    def scan(req: Request, names: tuple[str, ...] = (name,)) -> Finding | None:
        return findings(req, names).get(name)
    return scan


def _lfi(req: Request, names: tuple[str, ...] = ("lfi",)) -> Finding | None:
    path = unquote(unquote(req.path))
    why = web.restricted_path(path)
    if why:
        return Finding("lfi", "path", path, why)
    return findings(req, names).get("lfi")


def _scanner(req: Request, names: tuple[str, ...] = ()) -> Finding | None:
    ua = req.header("user-agent")
    why = _scanner_agent(ua) if ua and len(ua) <= _CACHED_LEN else web.scanner_agent(ua)
    if why:
        return Finding("scanner", "header:user-agent", ua, "scanner user agent " + why)
    where, why = web.scanner_request(unquote(req.path), [n for n, _ in req.headers])
    if why:
        return Finding("scanner", where, req.path if where == "path" else "", why)
    return None


_scanner_agent = lru_cache(maxsize=1024)(web.scanner_agent)   # user agents repeat


def _protocol(req: Request, names: tuple[str, ...] = ()) -> Finding | None:
    if req.anomalies:
        return Finding("protocol", "head", req.target, ", ".join(req.anomalies))
    return None


GROUPS: dict[str, Group] = {g.name: g for g in (
    Group("sqli", "sql-injection", "high", _value_group("sqli")),
    Group("xss", "cross-site-scripting", "high", _value_group("xss")),
    Group("lfi", "path-traversal", "high", _lfi),
    Group("rce", "command-injection", "critical", _value_group("rce")),
    Group("scanner", "scanner", "medium", _scanner),
    Group("protocol", "protocol-anomaly", "medium", _protocol),
)}
