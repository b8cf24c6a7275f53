"""The inventory: one Endpoint per (service, method, path template), fed HTTP
transactions (from HTTP/1 and, once the kind exists, HTTP/2 and gRPC events).

Merging is the one operation everything uses: a transaction is merged into its endpoint,
endpoints that a newly learned parameter makes one are merged, a stored inventory is
merged in at start, and several sensors' transactions land in the same endpoints. Every
fact is a set union, a min, a max or a sum, so the order never matters.

Bounds (docs/inventory.md): MAX_ENDPOINTS endpoints (past it a transaction of a new
endpoint is counted in `dropped`, not kept), and a cap on every per-endpoint set.
"""

from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from collector.inventory import templates

# Endpoints kept: ~2 KiB each with full sets, so ~100 MiB at worst. Past it, the
# transactions of endpoints not yet known are dropped and counted (Inventory.dropped).
MAX_ENDPOINTS = 50_000
# Per-endpoint caps: enough for any real API's variety; they stop a client that sends a
# new query parameter name per request from growing an endpoint without end.
MAX_QUERY_NAMES = 64
MAX_FIELDS = 128
MAX_CONTENT_TYPES = 8
MAX_SENSORS = 32
# PII keys ("card.response") per endpoint: sensor/l7/pii.py has 18; room for a newer
# sensor's types, and a bound against a sender that makes up keys.
MAX_PII_KEYS = 32
# Nested JSON objects are flattened to dotted names this deep.
MAX_FIELD_DEPTH = 4

AUTH_KINDS = ("bearer", "basic", "cookie", "api_key", "mtls")
_GRPC = "application/grpc"


def status_class(status: int) -> str:
    """'2xx' ... '5xx'; 'none' when no response was seen."""
    return f"{status // 100}xx" if 100 <= status <= 599 else "none"


@functools.lru_cache(maxsize=256)   # a service speaks a handful of content types
def media_type(content_type: str) -> str:
    """'application/json; charset=utf-8' -> 'application/json'."""
    return content_type.partition(";")[0].strip().lower()


def json_type(value) -> str:
    """The JSON Schema type of a decoded JSON value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def body_fields(body: bytes | str, limit: int = MAX_FIELDS) -> dict[str, str]:
    """Field name -> JSON type of a JSON body: nested objects as dotted names (up to
    MAX_FIELD_DEPTH), the members of objects in an array as 'name[].member'. A body that
    is not a JSON object or array (or is cut by a capture budget) gives nothing."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    out: dict[str, str] = {}

    def walk(value, prefix: str, depth: int) -> None:
        if isinstance(value, list):
            for item in value[:8]:  # a sample of the items is enough for their shape
                if isinstance(item, dict):
                    walk(item, prefix + "[]" if prefix else "[]", depth)
            return
        if not isinstance(value, dict) or depth >= MAX_FIELD_DEPTH:
            return
        for key, item in value.items():
            if len(out) >= limit:
                return
            name = f"{prefix}.{key}" if prefix else str(key)
            out.setdefault(name, json_type(item))
            if isinstance(item, (dict, list)):
                walk(item, name, depth + 1)

    walk(doc, "", 0)
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Transaction:
    """What the inventory takes from one HTTP event."""

    service: str
    method: str
    target: str                      # request target, query included
    ts_ns: int
    status: int = 0
    request_content_type: str = ""
    response_content_type: str = ""
    sensor_id: str = ""
    auth: tuple[str, ...] = ()       # AUTH_KINDS present on the request
    request_fields: dict[str, str] | None = None   # from body_fields(), when a body was kept
    response_fields: dict[str, str] | None = None
    pii: dict[str, int] | None = None               # "type.direction" -> occurrences
    # This many events alike in every field above but their time (the feed groups a
    # batch's events: collector/inventory/store.py), from ts_ns to last_ns (0: ts_ns).
    count: int = 1
    last_ns: int = 0


def service_of(host: str, dst_addr: str, dst_port: int) -> str:
    """host:port. The Host header names the service (port from the wire: behind NAT or
    a proxy the header's port can be another's); without one, the server address."""
    name = host.strip().lower()
    if name.startswith("["):
        name = name.partition("]")[0] + "]"
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if not name:
        name = f"[{dst_addr}]" if ":" in dst_addr else dst_addr
    return f"{name}:{dst_port}"


def _add_capped(target: set, values, cap: int) -> None:
    for value in values:
        if len(target) >= cap:
            return
        target.add(value)


def _merge_pii(target: dict[str, list[int]], key: str, count: int, first: int,
               last: int) -> None:
    """[occurrences, first seen ns, last seen ns] per "type.direction"."""
    have = target.get(key)
    if have is None:
        if len(target) < MAX_PII_KEYS:
            target[key] = [count, first, last]
        return
    have[0] += count
    have[1] = min(have[1], first)
    have[2] = max(have[2], last)


def _merge_fields(target: dict[str, list[str]], fields: dict) -> None:
    for name, types in fields.items():
        types = [types] if isinstance(types, str) else types
        have = target.get(name)
        if have is None:
            if len(target) >= MAX_FIELDS:
                continue
            have = target[name] = []
        for t in types:
            if t not in have:
                have.append(t)


@dataclass(slots=True)
class Endpoint:
    service: str
    method: str
    template: tuple[str, ...]
    first_seen_ns: int = 0
    last_seen_ns: int = 0
    requests: int = 0
    status_classes: dict[str, int] = field(default_factory=dict)
    request_content_types: set[str] = field(default_factory=set)
    response_content_types: set[str] = field(default_factory=set)
    auth: set[str] = field(default_factory=set)
    # Requests by credential kind, and requests with any / without any credential (the
    # event's own auth, per request: a keep-alive connection that mixes public and
    # authenticated requests marks only the authenticated ones). An endpoint stored
    # before these were counted has kinds without counts: its requests are more than
    # authenticated + unauthenticated.
    auth_counts: dict[str, int] = field(default_factory=dict)
    authenticated: int = 0
    unauthenticated: int = 0
    query_params: set[str] = field(default_factory=set)
    request_fields: dict[str, list[str]] = field(default_factory=dict)
    response_fields: dict[str, list[str]] = field(default_factory=dict)
    sensors: set[str] = field(default_factory=set)
    pii: dict[str, list[int]] = field(default_factory=dict)   # collector/inventory/pii.py

    @property
    def key(self) -> tuple[str, str, tuple[str, ...]]:
        return self.service, self.method, self.template

    @property
    def path_template(self) -> str:
        return templates.render(self.template)

    def add(self, tx: Transaction, query: str) -> None:
        count = tx.count
        last = max(tx.ts_ns, tx.last_ns)
        if not self.requests or tx.ts_ns < self.first_seen_ns:
            self.first_seen_ns = tx.ts_ns
        self.last_seen_ns = max(self.last_seen_ns, last)
        self.requests += count
        cls = status_class(tx.status)
        self.status_classes[cls] = self.status_classes.get(cls, 0) + count
        if tx.request_content_type:
            _add_capped(self.request_content_types, (media_type(tx.request_content_type),),
                        MAX_CONTENT_TYPES)
        if tx.response_content_type:
            _add_capped(self.response_content_types, (media_type(tx.response_content_type),),
                        MAX_CONTENT_TYPES)
        kinds = [a for a in tx.auth if a in AUTH_KINDS]
        if kinds:
            self.auth.update(kinds)
            for a in kinds:
                self.auth_counts[a] = self.auth_counts.get(a, 0) + count
            self.authenticated += count
        else:
            self.unauthenticated += count
        if query:
            _add_capped(self.query_params,
                        (k for k, _ in parse_qsl(query, keep_blank_values=True) if k),
                        MAX_QUERY_NAMES)
        if tx.request_fields:
            _merge_fields(self.request_fields, tx.request_fields)
        if tx.response_fields:
            _merge_fields(self.response_fields, tx.response_fields)
        if tx.sensor_id:
            _add_capped(self.sensors, (tx.sensor_id,), MAX_SENSORS)
        if tx.pii:
            for key, n in tx.pii.items():
                if n:
                    _merge_pii(self.pii, key, n * count, tx.ts_ns, last)

    def merge(self, other: "Endpoint") -> None:
        if other.requests:
            if not self.requests or other.first_seen_ns < self.first_seen_ns:
                self.first_seen_ns = other.first_seen_ns
            self.last_seen_ns = max(self.last_seen_ns, other.last_seen_ns)
        self.requests += other.requests
        for cls, n in other.status_classes.items():
            self.status_classes[cls] = self.status_classes.get(cls, 0) + n
        _add_capped(self.request_content_types, other.request_content_types, MAX_CONTENT_TYPES)
        _add_capped(self.response_content_types, other.response_content_types,
                    MAX_CONTENT_TYPES)
        self.auth |= other.auth
        for a, n in other.auth_counts.items():
            if a in AUTH_KINDS:
                self.auth_counts[a] = self.auth_counts.get(a, 0) + n
        self.authenticated += other.authenticated
        self.unauthenticated += other.unauthenticated
        _add_capped(self.query_params, other.query_params, MAX_QUERY_NAMES)
        _merge_fields(self.request_fields, other.request_fields)
        _merge_fields(self.response_fields, other.response_fields)
        _add_capped(self.sensors, other.sensors, MAX_SENSORS)
        for key, (n, first, last) in other.pii.items():
            _merge_pii(self.pii, key, n, first, last)

    def to_dict(self) -> dict:
        """The one JSON shape of an endpoint (store, RPC, `loupe endpoints --format json`)."""
        return {
            "service": self.service, "method": self.method,
            "path_template": self.path_template, "template": list(self.template),
            "first_seen_ns": self.first_seen_ns, "last_seen_ns": self.last_seen_ns,
            "requests": self.requests, "status_classes": dict(sorted(self.status_classes.items())),
            "request_content_types": sorted(self.request_content_types),
            "response_content_types": sorted(self.response_content_types),
            "auth": sorted(self.auth), "auth_counts": dict(sorted(self.auth_counts.items())),
            "authenticated": self.authenticated, "unauthenticated": self.unauthenticated,
            "query_params": sorted(self.query_params),
            "request_fields": dict(sorted(self.request_fields.items())),
            "response_fields": dict(sorted(self.response_fields.items())),
            "sensors": sorted(self.sensors),
            "pii": {k: list(v) for k, v in sorted(self.pii.items())},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Endpoint":
        return cls(
            service=d["service"], method=d["method"], template=tuple(d["template"]),
            first_seen_ns=int(d["first_seen_ns"]), last_seen_ns=int(d["last_seen_ns"]),
            requests=int(d["requests"]), status_classes=dict(d["status_classes"]),
            request_content_types=set(d["request_content_types"]),
            response_content_types=set(d["response_content_types"]),
            auth=set(d["auth"]),
            auth_counts={k: int(v) for k, v in d.get("auth_counts", {}).items()},
            authenticated=int(d.get("authenticated", 0)),
            unauthenticated=int(d.get("unauthenticated", 0)),
            query_params=set(d["query_params"]),
            request_fields={k: list(v) for k, v in d["request_fields"].items()},
            response_fields={k: list(v) for k, v in d["response_fields"].items()},
            sensors=set(d["sensors"]),
            pii={k: [int(x) for x in v] for k, v in d.get("pii", {}).items()},
        )


def _is_grpc(ep: Endpoint) -> bool:
    return any(t.startswith(_GRPC) for t in ep.request_content_types | ep.response_content_types)


class Inventory:
    """Endpoints by key, and the template learner. Thread-safe: the collector's writer
    thread adds, readers list."""

    def __init__(self, *, threshold: int = templates.THRESHOLD,
                 max_nodes: int = templates.MAX_NODES,
                 max_endpoints: int = MAX_ENDPOINTS) -> None:
        self.learner = templates.Learner(threshold, max_nodes)
        self.max_endpoints = max_endpoints
        self._endpoints: dict[tuple, Endpoint] = {}
        self._generation = 0
        self._lock = threading.Lock()
        self.dropped = 0                 # transactions of new endpoints past MAX_ENDPOINTS
        # Keys changed / removed since the last take_changes() (for the store).
        self._dirty: set[tuple] = set()
        self._removed: set[tuple] = set()

    def __len__(self) -> int:
        return len(self._endpoints)

    def add(self, tx: Transaction) -> None:
        with self._lock:
            self._add(tx)

    def add_many(self, txs) -> None:
        with self._lock:
            for tx in txs:
                self._add(tx)

    def _add(self, tx: Transaction) -> None:
        path, query = templates.split_target(tx.target)
        if tx.request_content_type.startswith(_GRPC) or tx.response_content_type.startswith(_GRPC):
            # gRPC paths are /package.Service/Method: every method is its own endpoint,
            # however many a service has.
            template = tuple(templates.segments(path))
        else:
            template = self.learner.learn(tx.service, path, weight=tx.count)
        self._refresh()
        key = (tx.service, tx.method, template)
        ep = self._endpoints.get(key)
        if ep is None:
            if len(self._endpoints) >= self.max_endpoints:
                self.dropped += tx.count
                return
            ep = self._endpoints[key] = Endpoint(tx.service, tx.method, template)
        ep.add(tx, query)
        self._dirty.add(key)

    def _put(self, ep: Endpoint) -> None:
        have = self._endpoints.get(ep.key)
        if have is None:
            self._endpoints[ep.key] = ep
        else:
            have.merge(ep)
        self._dirty.add(ep.key)

    def _refresh(self) -> None:
        """After a learned parameter: re-template the endpoints, merging those it made one."""
        if self._generation == self.learner.generation:
            return
        self._generation = self.learner.generation
        old = self._endpoints
        self._endpoints = {}
        for key, ep in old.items():
            new = ep.template if _is_grpc(ep) else self.learner.retemplate(ep.service, ep.template)
            if new != ep.template:
                self._removed.add(key)
                self._dirty.discard(key)
                ep.template = new
                self._put(ep)
            elif key in self._endpoints:
                self._put(ep)
            else:
                self._endpoints[key] = ep

    def merge(self, endpoints) -> None:
        """Merge endpoints from elsewhere (a stored inventory, another collector): their
        templates teach the learner (markers stay parameters), then they join as
        transactions would."""
        with self._lock:
            for ep in endpoints:
                stored = ep.key
                if not _is_grpc(ep):
                    ep.template = self.learner.learn(ep.service, "/" + "/".join(ep.template),
                                                     weight=max(1, ep.requests))
                if ep.key != stored:
                    # A position became a parameter for good while reading: the old
                    # row must go, or the next start would count it again.
                    self._removed.add(stored)
                self._refresh()
                self._put(ep)
            self._refresh()

    def endpoints(self) -> list[Endpoint]:
        """The inventory as it reads now: endpoints under their learned templates (rule 2
        of templates.py decided over all traffic so far), merged where one template
        covers several keys. Copies: the caller may keep them."""
        with self._lock:
            self._refresh()
            view = templates.View(self.learner)
            out: dict[tuple, Endpoint] = {}
            for ep in self._endpoints.values():
                template = ep.template if _is_grpc(ep) else view.template(ep.service, ep.template)
                key = (ep.service, ep.method, template)
                have = out.get(key)
                if have is None:
                    have = out[key] = Endpoint(ep.service, ep.method, template)
                have.merge(ep)
        return sorted(out.values(), key=lambda e: (e.service, e.template, e.method))

    def templates_for(self, pairs) -> dict[tuple, tuple[str, ...]]:
        """(service, path segments with shape parameters) -> the template endpoints()
        would put them under now; for the statistics (collector/stats), whose series
        follow the inventory's templates."""
        with self._lock:
            view = templates.View(self.learner)
            return {(s, k): view.template(s, self.learner.retemplate(s, k)) for s, k in pairs}

    def snapshot(self) -> list[dict]:
        """endpoints() as dicts."""
        return [ep.to_dict() for ep in self.endpoints()]

    def take_changes(self) -> tuple[list[dict], list[tuple]]:
        """(endpoints changed, keys removed) since the last call, for the store."""
        with self._lock:
            self._refresh()
            changed = [self._endpoints[k].to_dict() for k in self._dirty if k in self._endpoints]
            removed = [k for k in self._removed if k not in self._endpoints]
            self._dirty = set()
            self._removed = set()
            return changed, removed
