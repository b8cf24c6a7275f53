"""An HTTP request as the rules see it: parsed lazily from the raw head and body prefix the
HTTP/1 parser kept (sensor/l7/http1.py, HttpTransaction.request).

Only the rules stage reads these bytes; no record ever carries them (an Alert carries a
bounded, redacted excerpt, see alerts.py). Bounds: at most MAX_HEADERS header lines and
MAX_ARGS arguments per source are looked at, values are cut by decode.MAX_VALUE, JSON
bodies are walked to MAX_JSON_VALUES leaves and MAX_JSON_DEPTH levels.
"""

from __future__ import annotations

import json
import re
from urllib.parse import unquote, unquote_plus

MAX_HEADERS = 100
MAX_ARGS = 128
MAX_JSON_VALUES = 256
MAX_JSON_DEPTH = 16
# A single header line this long has no honest use; CRS and most proxies cap far lower.
OVERLONG_HEADER = 8192


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def split_args(query: str, plus: bool = True) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for part in query.split("&", MAX_ARGS)[:MAX_ARGS]:
        if not part:
            continue
        name, eq, value = part.partition("=")
        dec = unquote_plus if plus else unquote
        out.append((dec(name), dec(value) if eq else ""))
    return out


class Request:
    __slots__ = ("method", "target", "version", "headers", "body", "_args", "_cookies",
                 "_body_args", "anomalies", "_inputs", "findings")

    def __init__(self, head: bytes, body: bytes) -> None:
        # One decode of the whole head, then str work: cheaper than a decode per line.
        lines = _text(head).split("\n", MAX_HEADERS + 1)
        start = lines[0].rstrip("\r").split(" ")
        self.method = start[0] if start else ""
        self.target = start[1] if len(start) > 1 else ""
        self.version = start[2] if len(start) > 2 else ""
        headers: list[tuple[str, str]] = []
        anomalies: list[str] = []
        hosts = lengths = 0
        te = ""
        for line in lines[1:MAX_HEADERS + 1]:
            line = line.rstrip("\r")
            if not line:
                continue
            if len(line) > OVERLONG_HEADER:
                anomalies.append("overlong header")
            if line[0] in " \t" and headers:
                name, value = headers[-1]
                headers[-1] = (name, value + " " + line.strip())
                anomalies.append("obsolete line folding")
                continue
            name, _, value = line.partition(":")
            name = name.lower()
            value = value.strip(" \t")
            headers.append((name, value))
            # The framing headers, counted in the same pass (request smuggling shapes).
            if name == "host":
                hosts += 1
            elif name == "content-length":
                lengths += 1
            elif name == "transfer-encoding":
                te = value.lower()
            elif " " in name or "\t" in name:
                anomalies.append("whitespace in header name")
        self.headers = headers
        self.body = body
        self._args: list[tuple[str, str]] | None = None
        self._cookies: list[tuple[str, str]] | None = None
        self._body_args: list[tuple[str, str]] | None = None
        self._inputs: list[tuple[str, str]] | None = None
        self.findings = None   # managed.findings(): (detector names, results)
        if not hosts and self.version == "HTTP/1.1":
            anomalies.append("missing Host")
        if hosts > 1:
            anomalies.append("duplicate Host")
        if lengths > 1:
            anomalies.append("duplicate Content-Length")
        if lengths and te:
            anomalies.append("Content-Length with Transfer-Encoding")
        if te and te.replace(" ", "") not in ("chunked", "gzip,chunked", "deflate,chunked"):
            anomalies.append("unusual Transfer-Encoding")
        self.anomalies = anomalies

    def header(self, name: str) -> str:
        for n, v in self.headers:
            if n == name:
                return v
        return ""

    @property
    def path(self) -> str:
        p = self.target.split("?", 1)[0]
        if "://" in p:
            p = "/" + p.split("://", 1)[1].partition("/")[2]
        return p

    @property
    def query(self) -> str:
        return self.target.split("?", 1)[1] if "?" in self.target else ""

    def args(self) -> list[tuple[str, str]]:
        if self._args is None:
            self._args = split_args(self.query.split("#", 1)[0])
        return self._args

    def cookies(self) -> list[tuple[str, str]]:
        if self._cookies is None:
            out = []
            for n, v in self.headers:
                if n == "cookie":
                    for part in v.split(";")[:MAX_ARGS]:
                        name, _, value = part.strip().partition("=")
                        out.append((unquote(name), unquote(value)))
            self._cookies = out
        return self._cookies

    def body_args(self) -> list[tuple[str, str]]:
        """Form fields or JSON leaves of the body as (name, value); other bodies as one
        ("", text) pair, so detectors still see XML or multipart content."""
        if self._body_args is None:
            self._body_args = self._parse_body()
        return self._body_args

    def _parse_body(self) -> list[tuple[str, str]]:
        if not self.body:
            return []
        ctype = self.header("content-type").lower()
        text = _text(self.body)
        stripped = text.lstrip()
        if "json" in ctype or stripped[:1] in ("{", "[") and "form" not in ctype:
            try:
                doc = json.loads(text)
            except ValueError:
                return [("", text)]
            out: list[tuple[str, str]] = []
            _walk(doc, "", out, 0)
            return out
        if "xml" in ctype or stripped.startswith("<?xml"):
            return _xml_values(text)
        if "multipart/" in ctype:
            return _multipart(text, ctype)
        if "x-www-form-urlencoded" in ctype or (not ctype and "=" in text
                                                 and "<" not in stripped[:1]):
            return split_args(text)
        return [("", text)]

    def inputs(self) -> list[tuple[str, str]]:
        """Every user-controlled value with its label: path, query argument names and
        values, cookies, form/JSON body values, and the headers attackers write into.
        Made once per request: every managed group walks the same list."""
        if self._inputs is None:
            self._inputs = self._make_inputs()
        return self._inputs

    def _make_inputs(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = [("path", unquote(self.path))]
        for name, value in self.args():
            out.append((f"arg:{name}", value))
            if name and (not name.isalnum() or not value):
                out.append(("arg_name", name))   # a bare `?payload` is read as a name
        for name, value in self.cookies():
            out.append((f"cookie:{name}", value))
            if name and not name.replace("_", "").isalnum():
                out.append(("cookie_name", name))
        for name, value in self.body_args():
            out.append((f"body:{name}" if name else "body", value))
            if name and (not value or not name.replace("_", "").replace(".", "").isalnum()):
                out.append(("body_name", name))
        for n, v in self.headers:
            if n in ("user-agent", "referer", "x-forwarded-for", "x-real-ip", "from",
                     "x-api-version", "origin") or n.startswith("x-") and n not in (
                         "x-requested-with", "x-csrf-token", "x-request-id"):
                out.append((f"header:{n}", v))
            elif n not in _STANDARD and n not in ("cookie", "authorization"):
                out.append((f"header:{n}", v))
        return out


_STANDARD = frozenset((
    "host", "accept", "accept-encoding", "accept-language", "accept-charset", "connection",
    "content-length", "content-type", "cache-control", "pragma", "keep-alive",
    "proxy-connection", "upgrade-insecure-requests", "te", "transfer-encoding", "dnt",
    "if-modified-since", "if-none-match", "if-match", "if-unmodified-since", "range",
    "sec-fetch-site", "sec-fetch-mode", "sec-fetch-dest", "sec-fetch-user", "sec-ch-ua",
    "sec-ch-ua-mobile", "sec-ch-ua-platform", "priority", "expect", "upgrade", "via",
    "content-encoding", "authorization", "cookie",
))


def _walk(node, name: str, out: list, depth: int) -> None:
    if len(out) >= MAX_JSON_VALUES or depth > MAX_JSON_DEPTH:
        return
    if isinstance(node, dict):
        for k, v in node.items():
            if not str(k).replace("_", "").isalnum():
                out.append(("body_name", str(k)))
            _walk(v, f"{name}.{k}" if name else str(k), out, depth + 1)
    elif isinstance(node, list):
        for v in node:
            _walk(v, name, out, depth + 1)
    elif isinstance(node, str):
        out.append((name, node))




# XML attribute values and text nodes (bounded repetitions: no backtracking blow-up).
_XML_VALUE = re.compile(r'=\s*"([^"]{0,4096})"|=\s*\'([^\']{0,4096})\'|>([^<]{1,4096})<')


def _xml_values(text: str) -> list[tuple[str, str]]:
    out = []
    for m in _XML_VALUE.finditer(text):
        value = m.group(1) or m.group(2) or m.group(3) or ""
        if value.strip():
            out.append(("xml", value))
            if len(out) >= MAX_ARGS:
                break
    return out or [("", text)]


_PART_NAME = re.compile(r'\bname="([^"]{0,256})"', re.I)
_PART_FILE = re.compile(r'\bfilename="([^"]{0,1024})"', re.I)


def _multipart(text: str, ctype: str) -> list[tuple[str, str]]:
    """Each part's content by its name, and each uploaded file's name (RFC 7578)."""
    boundary = ctype.partition("boundary=")[2].split(";")[0].strip('" ')
    if not boundary:
        return [("", text)]
    out: list[tuple[str, str]] = []
    for part in text.split("--" + boundary)[:MAX_ARGS]:
        head, sep, content = part.partition("\r\n\r\n")
        if not sep:
            head, sep, content = part.partition("\n\n")
        if not sep:
            continue
        name = _PART_NAME.search(head)
        fname = _PART_FILE.search(head)
        if fname:
            out.append(("filename", fname.group(1)))
        out.append((name.group(1) if name else "", content.rstrip("\r\n")))
    return out
