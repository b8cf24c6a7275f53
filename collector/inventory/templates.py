"""Path templates, learned per service from the raw paths seen (sans-I/O, no clock).

Two rules turn a path segment into a parameter (docs/inventory.md):

1. Its shape: numeric -> {id}, UUID -> {uuid}, date -> {date}, a long hex or base64
   token -> {token}. Decided on the segment alone, as it arrives.
2. Its position: per prefix, the distinct static values seen there and how often each
   was seen. The position is a parameter ({name}) when it has more than THRESHOLD
   distinct values and most requests there bring a value not seen before (the
   Good-Turing estimate of a new value, values seen once / requests, is at least
   NEW_RATE): /users/alice, /users/bob, ... each seen once. A set of resources
   (/get, /post, /headers, ... each hit again and again) has distinct values too,
   but its values repeat. A threshold on distinct values alone (where Akto's URL
   merging starts) would also merge an API's fixed routes once there are enough of
   them; the repeat test keeps them apart.

Rule 2 is decided when the inventory is read (View), over the merged statistics of
every node the prefix stands for, so a decision taken early on little evidence is never
baked in. Only past MAX_VALUES distinct values is a position made a parameter for good,
and its values and subtrees folded into one node: that is the memory bound.

The learner is a trie per service. A node keeps at most MAX_VALUES static children plus
one per parameter kind; the whole learner holds at most MAX_NODES nodes (past that a
value that would need a new node takes the {name} child instead, and is counted), and a
path at most MAX_DEPTH segments (the rest is one {rest} parameter). A template is a
tuple of segments in which parameters are the markers below.
"""

from __future__ import annotations

import functools
import re

# A position with at most this many distinct values is never a learned parameter: small
# enumerations (4 image formats, 2 cookie actions) stay routes whatever their traffic.
THRESHOLD = 10
# ... and with more, it is one when at least this share of its requests brought a value
# seen only once (the Good-Turing estimate that the next request brings a new value).
# Parameters sit near 1 (each user, file, tag is asked for once or a few times), route
# sets near 0 once each route has been hit twice.
NEW_RATE = 0.5
# Distinct static values remembered per prefix. Past it the position is a parameter for
# good (no API has this many fixed routes at one level) and its values are forgotten:
# this, not THRESHOLD, bounds the memory of a prefix.
MAX_VALUES = 100
# Trie nodes per learner (all services together): ~10 static children each at most,
# a node costs ~0.4 KiB, so ~80 MiB at worst; 10,000 real endpoints need ~30,000.
MAX_NODES = 200_000
# Segments templated one by one; deeper ones become one trailing {rest}.
MAX_DEPTH = 24

ID, UUID, DATE, TOKEN, NAME, REST = "{id}", "{uuid}", "{date}", "{token}", "{name}", "{rest}"
PARAMS = (ID, UUID, DATE, TOKEN, NAME, REST)
# Parameter marker -> (OpenAPI type, format) for a spec.
SCHEMAS = {ID: ("integer", ""), UUID: ("string", "uuid"), DATE: ("string", "date"),
           TOKEN: ("string", ""), NAME: ("string", ""), REST: ("string", "")}

_NUMERIC = re.compile(r"-?\d+(?:\.\d+)?\Z")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                   r"[0-9a-fA-F]{12}\Z")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?"
                   r"(?:Z|[+-]\d{2}:?\d{2})?)?\Z")
_HEX = re.compile(r"[0-9a-fA-F]{16,}\Z")
_B64 = re.compile(r"[A-Za-z0-9+/_-]{8,}={0,2}\Z")


# Route segments repeat on every request; parameter values rarely do. The cache's bound
# keeps the values from growing it (~1 MiB at most).
@functools.lru_cache(maxsize=8192)
def classify(segment: str) -> str | None:
    """The parameter a segment is by its shape alone, or None for a static one."""
    if _NUMERIC.match(segment):
        return ID
    if len(segment) == 36 and _UUID.match(segment):
        return UUID
    if segment[:1].isdigit() and _DATE.match(segment):
        return DATE
    if _HEX.match(segment) and any(c.isdigit() for c in segment):
        return TOKEN
    if _B64.match(segment) and _looks_random(segment):
        return TOKEN
    return None


def _looks_random(segment: str) -> bool:
    """Base64 of bytes, not a word: padded to a multiple of 4, or long and mixing
    upper case, lower case and digits (camelCase words and slugs have no digits)."""
    if segment.endswith("=") and len(segment) % 4 == 0:
        return True
    return (len(segment) >= 16 and any(c.isdigit() for c in segment)
            and any(c.isupper() for c in segment) and any(c.islower() for c in segment))


def split_target(target: str) -> tuple[str, str]:
    """(path, query) of a request target: origin-form, absolute-form (a proxy request)
    or '*'. The fragment never travels, but a broken client may send one: dropped."""
    target = target.partition("#")[0]
    if "://" in target[:16]:
        rest = target.partition("://")[2]
        target = "/" + rest.partition("/")[2] if "/" in rest else "/"
    path, _, query = target.partition("?")
    return path, query


def segments(path: str) -> list[str]:
    """Non-empty segments; '/a//b/' and '/a/b' are one endpoint."""
    return [s for s in path.split("/") if s]


class _Node:
    __slots__ = ("static", "params", "open", "hits")

    def __init__(self) -> None:
        self.static: dict[str, _Node] = {}
        self.params: dict[str, _Node] = {}
        self.open = False   # the position below is a {name} for good (MAX_VALUES passed)
        self.hits = 0       # requests whose path passed through this node


class Learner:
    """Templates per service. Not thread-safe: the inventory holds its lock around it."""

    def __init__(self, threshold: int = THRESHOLD, max_nodes: int = MAX_NODES,
                 max_values: int = MAX_VALUES, new_rate: float = NEW_RATE) -> None:
        self.threshold = threshold
        self.max_nodes = max_nodes
        self.max_values = max_values
        self.new_rate = new_rate
        self._roots: dict[str, _Node] = {}
        self.nodes = 0
        self.overflow = 0        # values templated as {name} because MAX_NODES was reached
        # Bumped when a position becomes a parameter for good: keys handed out before may
        # have changed (the inventory then re-keys its endpoints, see retemplate()).
        self.generation = 0

    def _new(self) -> _Node:
        self.nodes += 1
        return _Node()

    def learn(self, service: str, path: str, weight: int = 1) -> tuple[str, ...]:
        """The key of `path` (no query), learning from it (`weight` requests): its
        segments with shape parameters and the positions made parameters for good; the
        rest of rule 2 is the View's."""
        node = self._roots.get(service)
        if node is None:
            node = self._roots[service] = self._new()
        node.hits += weight
        out = []
        segs = segments(path)
        for i, seg in enumerate(segs):
            if i == MAX_DEPTH:
                out.append(REST)
                break
            # A template's own markers (a stored inventory read back) stay parameters.
            kind = seg if seg in PARAMS else classify(seg)
            if kind is None and node.open:
                kind = NAME
            if kind is not None:
                node = self._param(node, kind)
                node.hits += weight
                out.append(kind)
                continue
            child = node.static.get(seg)
            if child is None:
                if self.nodes >= self.max_nodes or len(node.static) >= self.max_values:
                    if len(node.static) >= self.max_values:
                        self._promote(node)
                    else:
                        self.overflow += 1
                    node = self._param(node, NAME)
                    node.hits += weight
                    out.append(NAME)
                    continue
                child = node.static[seg] = self._new()
            node = child
            node.hits += weight
            out.append(seg)
        return tuple(out)

    def _param(self, node: _Node, kind: str) -> _Node:
        # Not refused past MAX_NODES: a node has at most one child per kind (6), so
        # parameter children cannot multiply the way static values can.
        child = node.params.get(kind)
        if child is None:
            child = node.params[kind] = self._new()
        return child

    def _promote(self, node: _Node) -> None:
        """Fold the node's static children into its {name} child, for good."""
        target = node.params.get(NAME) or self._new()
        for child in node.static.values():
            self._merge(target, child)
        node.static = {}
        node.params[NAME] = target
        node.open = True
        self.generation += 1

    def _merge(self, into: _Node, other: _Node) -> None:
        """Merge the subtree `other` into `into` (other is dropped), making positions
        parameters for good on the way where the union of static values passes
        MAX_VALUES."""
        self.nodes -= 1
        into.hits += other.hits
        for kind, child in other.params.items():
            if kind in into.params:
                self._merge(into.params[kind], child)
            else:
                into.params[kind] = child
        if other.open and not into.open:
            self._promote(into)
        for seg, child in other.static.items():
            if into.open:
                target = into.params[NAME]
                self._merge(target, child)
            elif seg in into.static:
                self._merge(into.static[seg], child)
            elif len(into.static) >= self.max_values:
                self._promote(into)
                self._merge(into.params[NAME], child)
            else:
                into.static[seg] = child

    def retemplate(self, service: str, template: tuple[str, ...]) -> tuple[str, ...]:
        """A key handed out before, as learn() would give it now (without learning):
        static segments at positions since made parameters for good become {name}."""
        node = self._roots.get(service)
        if node is None:
            return template
        out = []
        for seg in template:
            if node is None:
                out.append(seg)
                continue
            if seg in PARAMS:
                node = node.params.get(seg)
                out.append(seg)
            elif node.open:
                node = node.params.get(NAME)
                out.append(NAME)
            else:
                node = node.static.get(seg)
                out.append(seg)
        return tuple(out)


class View:
    """Rule 2 over the learner as it is now: each key (from learn()) to its template.
    Decisions are cached per (service, template prefix); make a new View to see new
    traffic. The nodes a template prefix stands for are all the nodes of the keys it
    covers, so /basic-auth/{name}/... judges the passwords under every user together."""

    def __init__(self, learner: Learner) -> None:
        self._learner = learner
        self._levels: dict[tuple, tuple[dict, dict]] = {}

    def template(self, service: str, key: tuple[str, ...]) -> tuple[str, ...]:
        root = self._learner._roots.get(service)
        if root is None:
            return key
        nodes, out = [root], ()
        for seg in key:
            rename, children = self._level(service, out, nodes)
            # A value not remembered: folded into a parameter for good, or never seen.
            soft = seg if seg in PARAMS else rename.get(seg, rename.get(NAME, seg))
            nodes = children.get(soft, [])
            out = out + (soft,)
        return out

    def _level(self, service: str, prefix: tuple, nodes: list[_Node]) -> tuple[dict, dict]:
        got = self._levels.get((service, prefix))
        if got is None:
            got = self._levels[(service, prefix)] = self._decide(nodes)
        return got

    def _decide(self, nodes: list[_Node]) -> tuple[dict, dict]:
        """(static value -> its template segment, template segment -> child nodes);
        rename[NAME] is present when the position is a parameter."""
        learner = self._learner
        merged: dict[str, list[_Node]] = {}
        children: dict[str, list[_Node]] = {}
        for node in nodes:
            for seg, child in node.static.items():
                merged.setdefault(seg, []).append(child)
            for kind, child in node.params.items():
                children.setdefault(kind, []).append(child)
        hits = {seg: sum(c.hits for c in cs) for seg, cs in merged.items()}
        total = sum(hits.values())
        once = sum(1 for h in hits.values() if h == 1)
        is_param = any(n.open for n in nodes) or (
            len(merged) > learner.threshold and once >= learner.new_rate * total)
        # Values seen once beside a busy {token}: tokens the shape test missed (a
        # base64 value without a digit), not routes.
        tokens = sum(c.hits for c in children.get(TOKEN, ())) > learner.threshold
        rename = {NAME: NAME} if is_param else {}
        for seg, cs in merged.items():
            if is_param:
                soft = NAME
            elif tokens and hits[seg] == 1:
                soft = TOKEN
            else:
                soft = seg
            rename[seg] = soft
            children.setdefault(soft, []).extend(cs)
        return rename, children


def render(template: tuple[str, ...]) -> str:
    """'/users/{id}/orders/{order_id}': markers become OpenAPI path parameters with
    unique names. A marker's first use keeps its name ({id}); a later one takes the
    preceding static segment's singular ({order_id}) or a number ({name2})."""
    return "/" + "/".join(param_names(template))


def param_names(template: tuple[str, ...]) -> list[str]:
    """The segments of a template with each marker renamed uniquely (see render)."""
    used: set[str] = set()
    out = []
    for i, seg in enumerate(template):
        if seg not in PARAMS:
            out.append(seg)
            continue
        base = seg[1:-1]
        name = base
        if name in used:
            prev = template[i - 1] if i else ""
            stem = re.sub(r"[^A-Za-z0-9_]", "_", prev.rstrip("s")) if prev and prev not in PARAMS else ""
            name = f"{stem}_{base}" if stem else base
            n = 2
            while name in used:
                name = f"{base}{n}"
                n += 1
        used.add(name)
        out.append("{" + name + "}")
    return out
