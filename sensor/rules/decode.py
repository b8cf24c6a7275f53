"""Decode a value the way the application behind the sensor will, all bounded.

An attacker hides a payload behind whatever decoding the application applies and the
inspector does not: percent-encoding (once or twice), `+` for space, HTML entities, JSON
string escapes. `variants()` returns the value under each plausible decoding, so every
detector sees each form. Bounds: values are cut to MAX_VALUE characters before decoding
(detectors are linear, but a bound keeps one request's cost fixed), percent-decoding runs
at most twice, and at most MAX_VARIANTS distinct forms come back.
"""

from __future__ import annotations

import html
import json
import re
from urllib.parse import unquote, unquote_plus

MAX_VALUE = 4096     # characters of one value inspected; longer values are cut
MAX_VARIANTS = 5

_PCT = re.compile(r"%[0-9A-Fa-f]{2}|%u[0-9A-Fa-f]{4}")
_UNI = re.compile(r"%u([0-9A-Fa-f]{4})")
_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,10};?")
_JSON_ESC = re.compile(r"\\(?:u[0-9A-Fa-f]{4}|[\"\\/bfnrt])")


def _unicode_pct(value: str) -> str:
    # IIS-style %uXXXX, which some stacks still decode.
    return _UNI.sub(lambda m: chr(int(m.group(1), 16)), value)


def url(value: str, plus: bool = True) -> str:
    if "%u" in value:
        value = _unicode_pct(value)
    return unquote_plus(value) if plus else unquote(value)


def entities(value: str) -> str:
    return html.unescape(value) if "&" in value else value


def json_escapes(value: str) -> str:
    if "\\" not in value:
        return value
    try:
        return json.loads('"' + value.replace('"', '\\"') + '"')
    except ValueError:
        return _JSON_ESC.sub(lambda m: json.loads('"' + m.group(0) + '"'), value)


# Entities browsers know, matched without regard to case (CRS tests and attackers
# write &Tab; as &tab;); html.unescape knows only the exact spelling.
_LOOSE_ENTITIES = {"tab": "\t", "newline": "\n", "colon": ":", "lpar": "(", "rpar": ")",
                   "sol": "/", "period": ".", "comma": ",", "excl": "!", "quot": '"',
                   "apos": "'", "lt": "<", "gt": ">", "grave": "`", "lowbar": "_",
                   "num": "#", "semi": ";", "equals": "=", "plus": "+", "bsol": "\\"}
_LOOSE = re.compile(r"&([a-z]{2,8});", re.I)
_HIGH = re.compile(r"[\x80-\xff]")
_HEX_ESC = re.compile(r"\\x([0-9A-Fa-f]{2})")


def loose_entities(value: str) -> str:
    return _LOOSE.sub(lambda m: _LOOSE_ENTITIES.get(m.group(1).lower(), m.group(0)), value)


def hex_escapes(value: str) -> str:
    """`\\x3c` escapes as JavaScript, PHP and Python strings read them; a byte with the
    high bit set is also read with it cleared, as US-ASCII decoders that drop bit 7 do
    (`\\xbcscript\\xbe` is `<script>` there)."""
    value = _HEX_ESC.sub(lambda m: chr(int(m.group(1), 16)), value)
    if _HIGH.search(value):
        value = _HIGH.sub(lambda m: chr(ord(m.group(0)) & 0x7F), value)
    return value


def variants(value: str) -> list[str]:
    """value and its decodings (deduplicated, at most MAX_VARIANTS, raw first)."""
    if len(value) > MAX_VALUE:
        value = value[:MAX_VALUE]
    out = [value]
    seen = {value}

    def add(v: str) -> None:
        if v not in seen and len(out) < MAX_VARIANTS:
            seen.add(v)
            out.append(v)

    cur = value
    for _ in range(2):           # single and double percent-decoding
        if "%" not in cur:
            break
        nxt = url(cur, plus=False)
        if nxt == cur:
            break
        add(nxt)
        cur = nxt
    if "&" in value or "&" in cur:
        add(loose_entities(entities(cur)))
    if "\\x" in cur or _HIGH.search(cur):
        add(hex_escapes(cur))
    if "\\" in cur:
        add(json_escapes(cur))
    if "&" in cur and "\\" in cur:
        add(json_escapes(entities(cur)))
    return out
