"""Managed rule groups: the built-in detectors, switched on by name, each in a mode.

A group runs its detector over every user-controlled input of a request (request.py:
path, query argument names and values, cookies, form and JSON body values, the headers
attackers write into), each under every decoding the application may apply
(decode.variants). The first hit is the group's finding; one request gives at most one
finding per group.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    scan: Callable[[Request], Finding | None]


def _values(name: str, req: Request, detect: Callable[[str], str],
            skip: tuple[str, ...] = ()) -> Finding | None:
    for field, value in req.inputs():
        if not value or field.startswith(skip):
            continue
        for form in decode.variants(value):
            why = detect(form)
            if why:
                return Finding(name, field, form, why)
    return None


def _sqli(req: Request) -> Finding | None:
    return _values("sqli", req, _sql_or_nosql, skip=("path",))


def _sql_or_nosql(value: str) -> str:
    return sqli.detect(value) or sqli.nosql_name(value)


def _xss(req: Request) -> Finding | None:
    return _values("xss", req, web.xss)


def _lfi(req: Request) -> Finding | None:
    path = unquote(unquote(req.path))
    why = web.restricted_path(path)
    if why:
        return Finding("lfi", "path", path, why)
    return _values("lfi", req, web.traversal, skip=("path",))


def _rce(req: Request) -> Finding | None:
    return _values("rce", req, shell.detect, skip=("path",))


def _scanner(req: Request) -> Finding | None:
    ua = req.header("user-agent")
    why = web.scanner_agent(ua) if ua else ""
    if why:
        return Finding("scanner", "header:user-agent", ua, "scanner user agent " + why)
    where, why = web.scanner_request(unquote(req.path), [n for n, _ in req.headers])
    if why:
        return Finding("scanner", where, req.path if where == "path" else "", why)
    return None


def _protocol(req: Request) -> Finding | None:
    if req.anomalies:
        return Finding("protocol", "head", req.target, ", ".join(req.anomalies))
    return None


GROUPS: dict[str, Group] = {g.name: g for g in (
    Group("sqli", "sql-injection", "high", _sqli),
    Group("xss", "cross-site-scripting", "high", _xss),
    Group("lfi", "path-traversal", "high", _lfi),
    Group("rce", "command-injection", "critical", _rce),
    Group("scanner", "scanner", "medium", _scanner),
    Group("protocol", "protocol-anomaly", "medium", _protocol),
)}
