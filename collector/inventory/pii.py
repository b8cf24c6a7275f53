"""PII statistics per endpoint: the inventory's view of the sensors' PII counts.

Sensors count PII occurrences per HTTP event ("card.response": 1, sensor/l7/pii.py); the
inventory adds them to the event's endpoint (Endpoint.pii: occurrences, first and last
seen per "type.direction"), so they are stored, merged across sensors and re-templated
with the endpoint itself, and survive a restart in inventory.sqlite. This module turns
endpoints into rows (one per endpoint, type and direction) for Observer.Pii and
`loupe pii`. Counts only: no value ever reaches the collector.
"""

from __future__ import annotations

COLUMNS = ["service", "method", "path_template", "type", "direction", "count",
           "first_seen_ns", "last_seen_ns", "requests", "auth"]
COLUMN_TYPES = ["VARCHAR", "VARCHAR", "VARCHAR", "VARCHAR", "VARCHAR", "UBIGINT",
                "UBIGINT", "UBIGINT", "UBIGINT", "VARCHAR[]"]


def rows(endpoints: list[dict]) -> list[dict]:
    """Endpoint dicts (Endpoint.to_dict) -> PII rows, in endpoint order, then by type and
    direction. `auth` is the endpoint's authentication kinds (empty: none seen), so
    "a card number in a response of an endpoint without auth" is one filter away."""
    out = []
    for ep in endpoints:
        for key, (count, first, last) in sorted(ep.get("pii", {}).items()):
            kind, _, direction = key.partition(".")
            out.append({
                "service": ep["service"], "method": ep["method"],
                "path_template": ep["path_template"], "type": kind, "direction": direction,
                "count": count, "first_seen_ns": first, "last_seen_ns": last,
                "requests": ep["requests"], "auth": list(ep["auth"]),
            })
    return out
