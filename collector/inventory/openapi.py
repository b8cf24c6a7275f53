"""OpenAPI 3.1 from the inventory, and the inventory against a given spec.

spec(): one path item per path template, one operation per method; path parameters from
the template's markers (typed by templates.SCHEMAS), query parameters from the names
seen, request and response bodies from the JSON fields seen (dotted names rebuilt into
nested object schemas), responses per status class ("2XX"), security schemes per auth
kind seen (components), and an operation's `security` only when every request of it
was seen to carry a credential: its alternatives are the kinds seen (any one of them
satisfies it, as OpenAPI reads a list). An operation with some requests without one
declares none: the observation says it is served without authentication. The cookie
and API key names are not observed (only kinds are kept), so they are the common ones.
Endpoints of several services go into one document (paths of the same
template merge); `--service` gives one service's document.

diff(): observed endpoints matched to the spec's operations by method and path, where a
spec parameter segment matches any observed segment:
  shadow   observed, matching no operation of the spec
  zombie   observed, matching an operation marked deprecated
  unused   an operation no observed endpoint matches
  drift    matched, but observed query parameters or request body fields the operation
           does not declare
"""

from __future__ import annotations

import re

from collector.inventory import templates

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

_SECURITY = {
    "bearer": ("bearerAuth", {"type": "http", "scheme": "bearer"}),
    "basic": ("basicAuth", {"type": "http", "scheme": "basic"}),
    "cookie": ("cookieAuth", {"type": "apiKey", "in": "cookie", "name": "session"}),
    "api_key": ("apiKeyAuth", {"type": "apiKey", "in": "header", "name": "X-API-Key"}),
    "mtls": ("mutualTLS", {"type": "mutualTLS"}),
}


def _type_schema(types: list[str]) -> dict:
    kinds = [t for t in types if t in ("string", "integer", "number", "boolean", "array",
                                       "object", "null")]
    if not kinds:
        return {}
    return {"type": kinds[0] if len(kinds) == 1 else kinds}


def fields_schema(fields: dict[str, list[str]]) -> dict:
    """A JSON Schema object from dotted field names ('a.b', 'items[].id') and types."""
    root: dict = {"type": "object", "properties": {}}

    def node_for(parts: list[str]) -> dict:
        node = root
        for part in parts:
            array = part.endswith("[]")
            name = part[:-2] if array else part
            if name:
                props = node.setdefault("properties", {})
                node = props.setdefault(name, {"type": "array" if array else "object"})
            if array:
                node = node.setdefault("items", {"type": "object"})
            node.setdefault("properties", {})
        return node

    for name in sorted(fields):
        parent, _, leaf = name.rpartition(".")
        if leaf.endswith("[]"):
            continue  # an array of objects: its members describe it
        holder = node_for(parent.split(".")) if parent else root
        holder.setdefault("properties", {}).setdefault(leaf, {}).update(
            _type_schema(fields[name]))
    return root


def _operation(ep: dict) -> dict:
    names = templates.param_names(tuple(ep["template"]))
    params = []
    for marker, name in zip(ep["template"], names):
        if marker in templates.PARAMS:
            kind, fmt = templates.SCHEMAS[marker]
            schema = {"type": kind, **({"format": fmt} if fmt else {})}
            params.append({"name": name[1:-1], "in": "path", "required": True, "schema": schema})
    for q in ep["query_params"]:
        params.append({"name": q, "in": "query", "required": False, "schema": {"type": "string"}})
    op: dict = {"operationId": _operation_id(ep), "summary": f"seen {ep['requests']} times"}
    if params:
        op["parameters"] = params
    req_types = ep["request_content_types"] or (["application/json"] if ep["request_fields"] else [])
    if req_types:
        op["requestBody"] = {"content": {
            t: ({"schema": fields_schema(ep["request_fields"])}
                if ep["request_fields"] and "json" in t else {}) for t in req_types}}
    responses = {}
    for cls in ep["status_classes"]:
        if cls == "none":
            continue
        resp: dict = {"description": f"{cls} responses seen"}
        if ep["response_content_types"] and cls[0] in "23":
            resp["content"] = {t: ({"schema": fields_schema(ep["response_fields"])}
                                   if ep["response_fields"] and "json" in t else {})
                               for t in ep["response_content_types"]}
        responses[cls.upper()] = resp
    op["responses"] = responses or {"default": {"description": "no response seen"}}
    requests = ep.get("requests", 0)
    if requests and ep.get("authenticated", 0) == requests:
        security = [{_SECURITY[a][0]: []} for a in ep["auth"] if a in _SECURITY]
        if security:
            op["security"] = security
    return op


def _operation_id(ep: dict) -> str:
    path = re.sub(r"[^A-Za-z0-9]+", "_", templates.render(tuple(ep["template"]))).strip("_")
    return f"{ep['method'].lower()}_{path or 'root'}"


def spec(endpoints: list[dict], *, title: str = "Observed API", version: str = "observed"
         ) -> dict:
    """An OpenAPI 3.1 document (a dict) for these endpoints."""
    paths: dict[str, dict] = {}
    used_security: dict[str, dict] = {}
    servers = sorted({ep["service"] for ep in endpoints})
    seen_ids: set[str] = set()
    for ep in sorted(endpoints, key=lambda e: (e["path_template"], e["method"], e["service"])):
        method = ep["method"].lower()
        if method not in HTTP_METHODS:
            continue
        item = paths.setdefault(templates.render(tuple(ep["template"])), {})
        if method in item:
            continue  # the same operation on another service: one is enough for the shape
        op = _operation(ep)
        while op["operationId"] in seen_ids:
            op["operationId"] += "_"
        seen_ids.add(op["operationId"])
        item[method] = op
        for a in ep["auth"]:
            if a in _SECURITY:
                used_security[_SECURITY[a][0]] = _SECURITY[a][1]
    doc: dict = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version,
                 "description": "Generated by `loupe api spec` from observed traffic."},
        "servers": [{"url": f"http://{s}"} for s in servers],
        "paths": paths,
    }
    if used_security:
        doc["components"] = {"securitySchemes": used_security}
    return doc


# -- diff ---------------------------------------------------------------------------------

def _spec_segments(path: str) -> tuple:
    """'/users/{id}' -> ('users', None): None matches any observed segment."""
    return tuple(None if re.fullmatch(r"\{[^}]*\}", s) else s for s in templates.segments(path))


class _Node:
    """A node of the spec's path trie: children by segment (None: a parameter), and the
    operations whose path ends here."""

    __slots__ = ("children", "ops")

    def __init__(self) -> None:
        self.children: dict = {}
        self.ops: list[int] = []


def _index(ops: list) -> dict[str, _Node]:
    """One path trie per method: matching an endpoint walks its segments (a literal
    child and the parameter child at each) instead of trying every operation, which at
    10,000 endpoints x 2,000 operations is the difference between ~12 s and well under
    one (the [api] spec check runs every minute, collector/inventory/api_alerts.py)."""
    roots: dict[str, _Node] = {}
    for i, (method, _, segs, _, _) in enumerate(ops):
        node = roots.setdefault(method, _Node())
        for seg in segs:
            node = node.children.setdefault(seg, _Node())
        node.ops.append(i)
    return roots


def _hits(root: _Node | None, observed: tuple) -> list[int]:
    """The operations (indices, in spec order) whose path matches: same length, every
    segment equal or a parameter."""
    out: list[int] = []
    stack = [(root, 0)] if root is not None else []
    while stack:
        node, k = stack.pop()
        if k == len(observed):
            out.extend(node.ops)
            continue
        for key in (observed[k], None):
            child = node.children.get(key)
            if child is not None:
                stack.append((child, k + 1))
    return sorted(out)


def _declared(op: dict, item: dict, doc: dict) -> tuple[set[str], set[str] | None]:
    """(query parameter names, top-level request body property names or None when the
    spec does not say) of an operation."""
    query = set()
    for p in list(item.get("parameters", [])) + list(op.get("parameters", [])):
        p = _deref(p, doc)
        if p.get("in") == "query" and "name" in p:
            query.add(p["name"])
    props = None
    body = _deref(op.get("requestBody") or {}, doc)
    for media in (body.get("content") or {}).values():
        schema = _deref((media or {}).get("schema") or {}, doc)
        if "properties" in schema:
            props = (props or set()) | set(schema["properties"])
    return query, props


def _deref(obj: dict, doc: dict) -> dict:
    """Follow a local $ref ('#/components/...'); other refs are left as they are."""
    for _ in range(8):  # bounded: a ref cycle does not loop forever
        ref = obj.get("$ref") if isinstance(obj, dict) else None
        if not isinstance(ref, str) or not ref.startswith("#/"):
            return obj if isinstance(obj, dict) else {}
        target = doc
        for part in ref[2:].split("/"):
            target = target.get(part.replace("~1", "/").replace("~0", "~"), {}) if isinstance(
                target, dict) else {}
        obj = target
    return {}


def diff(doc: dict, endpoints: list[dict]) -> list[dict]:
    """Findings, one dict each: {kind, method, path, service, detail}."""
    ops = []
    for path, item in (doc.get("paths") or {}).items():
        if not isinstance(item, dict):
            continue
        for method in HTTP_METHODS:
            if isinstance(item.get(method), dict):
                ops.append((method.upper(), path, _spec_segments(path), item[method], item))
    out = []
    used = set()
    index = _index(ops)
    for ep in sorted(endpoints, key=lambda e: (e["path_template"], e["method"], e["service"])):
        hits = _hits(index.get(ep["method"]), tuple(ep["template"]))
        base = {"method": ep["method"], "path": ep["path_template"], "service": ep["service"]}
        if not hits:
            out.append({"kind": "shadow", **base, "detail": "seen, not in the spec"})
            continue
        # The most specific match: the most static segments.
        best = max(hits, key=lambda i: sum(s is not None for s in ops[i][2]))
        used.update(hits)
        method, path, _, op, item = ops[best]
        if op.get("deprecated"):
            out.append({"kind": "zombie", **base,
                        "detail": f"deprecated in the spec as {method} {path}, still called "
                                  f"({ep['requests']} requests)"})
        query, props = _declared(op, item, doc)
        extra_q = sorted(set(ep["query_params"]) - query)
        if extra_q:
            out.append({"kind": "drift", **base,
                        "detail": f"query parameters not in the spec: {', '.join(extra_q)}"})
        if props is not None:
            top = {f.split(".")[0].removesuffix("[]") for f in ep["request_fields"]}
            extra_f = sorted(top - props)
            if extra_f:
                out.append({"kind": "drift", **base,
                            "detail": f"request body fields not in the spec: {', '.join(extra_f)}"})
    for i, (method, path, _, op, _) in enumerate(ops):
        if i not in used:
            out.append({"kind": "unused", "method": method, "path": path, "service": "",
                        "detail": "in the spec, never seen"
                                  + (" (deprecated)" if op.get("deprecated") else "")})
    return out
