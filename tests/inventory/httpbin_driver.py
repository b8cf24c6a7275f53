"""Drive httpbin: `python httpbin_driver.py HOST PORT N SEED` sends N requests (bounded)
spread over every (route, method) of httpbin's own url_map, with random path values of
each parameter's kind, a random query string on some, and a JSON body on the methods
that take one. Prints one JSON line: the (method, rule) pairs it drove."""

from __future__ import annotations

import base64
import http.client
import json
import random
import string
import sys

# Bounds on values that size a response or its time: the driver stays seconds long.
SMALL = {"n": (1, 5), "numbytes": (1, 64), "offset": (0, 4), "value": (0, 9999),
         "delay": None, "codes": None}
CODES = ["200", "201", "204", "400", "401", "403", "404", "418", "500", "503"]
SKIP = {"/static/<path:filename>"}   # files of the package, not an API route


def routes():
    import httpbin

    out = []
    for rule in httpbin.app.url_map.iter_rules():
        if rule.rule in SKIP:
            continue
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            out.append((method, rule))
    return sorted(out, key=lambda r: (r[1].rule, r[0]))


def word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 9)))


def value(rng: random.Random, name: str, converter: str) -> str:
    if name == "delay":
        return rng.choice(["0", "0.001", "0.002"])
    if name == "codes":
        return rng.choice(CODES)
    if name == "value" and converter != "IntegerConverter":   # /base64/<value>
        return base64.urlsafe_b64encode(rng.randbytes(rng.randint(9, 24))).decode()
    if converter == "IntegerConverter":
        low, high = SMALL.get(name) or (0, 9999)
        return str(rng.randint(low, high))
    return word(rng)


def build(rng: random.Random, rule) -> str:
    # werkzeug's parsed rule: (is_dynamic, text) parts, a variable's name when dynamic.
    out = []
    for is_dynamic, part in rule._trace:
        if is_dynamic:
            conv = type(rule._converters[part]).__name__
            out.append(value(rng, part, conv))
        else:
            out.append(part)
    path = "".join(out)
    path = path[path.index("|") + 1:] if "|" in path else path   # drop werkzeug's host part
    if path.startswith("/drip"):
        return path + "?duration=0&numbytes=4&delay=0"
    if rng.random() < 0.3:
        path += f"?{word(rng)[:3]}={rng.randint(0, 9)}&page={rng.randint(1, 5)}"
    return path


def main() -> None:
    host, port, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(seed)
    pairs = routes()
    order = [pairs[i % len(pairs)] for i in range(n)]
    rng.shuffle(order)
    for method, rule in order:
        target = build(rng, rule)
        body, headers = None, {"Accept": "*/*", "Host": f"{host}:{port}"}
        if method in ("POST", "PUT", "PATCH"):
            body = json.dumps({"name": word(rng), "count": rng.randint(0, 9)})
            headers["Content-Type"] = "application/json"
        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            conn.request(method, target, body=body, headers=headers)
            conn.getresponse().read()
        finally:
            conn.close()
    print(json.dumps(sorted({(m, r.rule) for m, r in pairs})))


if __name__ == "__main__":
    main()
