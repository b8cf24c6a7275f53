"""What a rule can match on: the fields of one L7 event, by name.

A field name resolves to a list of (label, value) pairs, because some fields have many
values (every query argument, every cookie). Names:

  kind method host path uri query status user_agent src dst src_port dst_port
  arg:NAME args  header:NAME  cookie:NAME cookies  body body:NAME
  dns.qname tls.sni tls.ja4 sql kafka.topic   detail.NAME (any field of the event's detail)
  pii  pii.TYPE.DIRECTION (PII counts of an HTTP event, sensor/l7/pii.py: pii.card.response
       is how many card numbers its sampled response held; no value when none)

HTTP fields other than method/host/path/status/user_agent need the raw request (kept by
the HTTP/1 parser when rules are on); the path is the raw target's path there, else the
record's (redacted) path. An event of another kind simply has no value for `method`.
"""

from __future__ import annotations

from urllib.parse import unquote

from sensor.l7.pii import KEYS
from sensor.model import L7Event
from sensor.rules.request import Request

# Field names with a fixed meaning; everything else must be prefix:NAME or detail.NAME.
FIXED = frozenset((
    "kind", "method", "host", "path", "uri", "query", "status", "user_agent", "src", "dst",
    "src_port", "dst_port", "args", "cookies", "body", "headers", "dns.qname", "tls.sni",
    "tls.ja4", "sql", "kafka.topic", "pii",
))
PREFIXES = ("arg:", "header:", "cookie:", "body:", "detail.", "pii.")
NUMERIC = frozenset(("status", "src_port", "dst_port"))
PII_KEYS = frozenset(KEYS)


def known(name: str) -> bool:
    if name.startswith("pii."):
        return name[4:] in PII_KEYS   # a misspelt type would never match: refuse it
    return name in FIXED or (name.startswith(PREFIXES) and len(name) > name.find(":") + 1)


class Subject:
    """One event (and its raw request, if kept) as rules see it. Values are computed on
    first use only: most rules look at one or two fields."""

    __slots__ = ("event", "request", "_path")

    def __init__(self, event: L7Event, request: Request | None) -> None:
        self.event = event
        self.request = request
        self._path: str | None = None

    def path(self) -> str:
        if self._path is None:
            if self.request is not None:
                self._path = unquote(self.request.path)
            else:
                self._path = getattr(self.event.detail, "path", "").split("?", 1)[0]
        return self._path

    def host(self) -> str:
        if self.request is not None:
            h = self.request.header("host")
            if h:
                return h
        return getattr(self.event.detail, "host", "")

    def values(self, name: str) -> list[tuple[str, object]]:
        """The (label, value) pairs of a field; getter(name) is the fast path."""
        return getter(name)(self)

    def _values(self, name: str) -> list[tuple[str, object]]:
        ev, d, req = self.event, self.event.detail, self.request
        if name == "kind":
            return [(name, ev.kind)]
        if name in ("src", "dst"):
            return [(name, ev.src_addr if name == "src" else ev.dst_addr)]
        if name in ("src_port", "dst_port"):
            return [(name, getattr(ev, name))]
        if name == "path":
            return [(name, self.path())] if hasattr(d, "path") or req else []
        if name == "host":
            return [(name, self.host())] if hasattr(d, "host") else []
        if name == "status":
            return [(name, d.status)] if hasattr(d, "status") and d.status else []
        if name == "user_agent":
            return [(name, getattr(d, "user_agent", ""))] if hasattr(d, "user_agent") else []
        if name == "method":
            return [(name, d.method)] if hasattr(d, "method") and d.method else []
        if name == "dns.qname":
            return [(name, d.qname)] if hasattr(d, "qname") else []
        if name == "tls.sni":
            return [(name, d.sni)] if hasattr(d, "sni") else []
        if name == "tls.ja4":
            return [(name, d.ja4)] if hasattr(d, "ja4") else []
        if name == "sql":
            return [(name, d.statement)] if getattr(d, "statement", "") else []
        if name == "kafka.topic":
            topics = getattr(d, "topics", None) or ([d.topic] if getattr(d, "topic", "") else [])
            return [(name, t) for t in topics]
        if name.startswith("detail."):
            attr = name[7:]
            return [(name, getattr(d, attr))] if hasattr(d, attr) else []
        if name == "pii" or name.startswith("pii."):
            # Counts only: a rule matches on how many, never sees a value.
            counts = getattr(d, "pii", None) or {}
            if name == "pii":
                return [(f"pii.{k}", n) for k, n in counts.items()]
            n = counts.get(name[4:], 0)
            return [(name, n)] if n else []
        if req is None:
            return []
        if name == "uri":
            return [(name, req.target)]
        if name == "query":
            return [(name, req.query)]
        if name == "args":
            return [(f"arg:{n}", v) for n, v in req.args()]
        if name.startswith("arg:"):
            want = name[4:]
            return [(name, v) for n, v in req.args() if n == want]
        if name == "headers":
            return [(f"header:{n}", v) for n, v in req.headers]
        if name.startswith("header:"):
            want = name[7:].lower()
            return [(name, v) for n, v in req.headers if n == want]
        if name == "cookies":
            return [(f"cookie:{n}", v) for n, v in req.cookies()]
        if name.startswith("cookie:"):
            want = name[7:]
            return [(name, v) for n, v in req.cookies() if n == want]
        if name == "body":
            return [("body", req.body.decode("utf-8", "replace"))] if req.body else []
        if name.startswith("body:"):
            want = name[5:]
            return [(name, v) for n, v in req.body_args() if n == want]
        return []


def _status(s: Subject) -> list[tuple[str, object]]:
    status = getattr(s.event.detail, "status", 0)
    return [("status", status)] if status else []


def _method(s: Subject) -> list[tuple[str, object]]:
    method = getattr(s.event.detail, "method", "")
    return [("method", method)] if method else []


def _path(s: Subject) -> list[tuple[str, object]]:
    return [("path", s.path())] if s.request is not None or hasattr(s.event.detail, "path") \
        else []


# The fields most rules use, without the general lookup's chain of comparisons: a rule's
# condition resolves its field once, at load.
_FAST = {"status": _status, "method": _method, "path": _path,
         "src": lambda s: [("src", s.event.src_addr)],
         "dst": lambda s: [("dst", s.event.dst_addr)]}


def getter(name: str):
    """subject -> [(label, value)] for one field name."""
    fast = _FAST.get(name)
    if fast is not None:
        return fast
    return lambda s: Subject._values(s, name)
