"""PII statistics in the sensor: occurrences per type in HTTP requests and sampled
responses, counted and never kept (docs/pii.md).

Strategy
- A request is turned into (name, value) pairs: the decoded path, the decoded query
  arguments, the header fields, and the form or JSON fields of the captured body prefix
  (other bodies as one text). Name rules run per pair (passwords, key-named secrets);
  pattern rules run once over all values joined by newlines, which no pattern crosses: one
  regex pass per type instead of one per value.
- Each pattern match is then checked the way the format itself is checked: Luhn and an IIN
  prefix for cards, the country length and mod-97 for IBANs, the range rules for SSNs, the
  JSON header with "alg" for JWTs, ipaddress for addresses. A match that fails its check is
  not counted (a near miss: a test card number with a wrong check digit, a bad IBAN).
- Spans already counted as a card, IBAN, SSN or JWT are blanked before the phone and
  address patterns run, so one value is counted as one type.
- What comes out is a mapping "type.direction" -> count (email.request, card.response).
  The values themselves go nowhere: no record, log line, metric or Alert carries them.

Deliberately not counted (each one is a false-positive source on ordinary traffic):
- the Host header and the request's own authority: the address of the connection itself
  is not personal data in the request; addresses are counted in values (X-Forwarded-For,
  query arguments, bodies);
- addresses in User-Agent: browser versions ("Chrome/120.0.0.0") read as dotted quads;
- 9 bare digits as an SSN (only 123-45-6789 with dashes or spaces) and phone numbers
  without a "+" or the (NPA) NXX-XXXX separators: bare digit runs are ids far more often;
- anti-forgery tokens (csrf/xsrf names) as secrets: per-session nonces, not credentials.

Bounds (why): MAX_VALUES pairs per message and MAX_VALUE characters per value (the rules
engine's bounds: real forms are far smaller, and the cost of a message stays bounded
whatever a client sends); JSON walked to MAX_DEPTH levels.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass
from urllib.parse import unquote, unquote_plus

TYPES = ("email", "card", "iban", "phone", "ssn", "ip", "jwt", "secret", "password")
DIRECTIONS = ("request", "response")
KEYS = tuple(f"{t}.{d}" for t in TYPES for d in DIRECTIONS)

MAX_VALUES = 256
MAX_VALUE = 4096
MAX_DEPTH = 16
MAX_ARGS = 128
DEFAULT_RESPONSE_BYTES = 4096

# -- patterns -------------------------------------------------------------------------------

_AT = re.compile("@")
_LOCAL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-")
_LOCAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}\Z")
_DOMAIN = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}"
                     r"(?![A-Za-z0-9-])")
_DIGIT = re.compile(r"\d")
# An IBAN's start, or a run (7 or more characters: the shortest address) of digits and
# the separators that cards, SSNs, phones and addresses use.
_RUN = re.compile(r"[A-Z]{2}\d\d|[+(]?\d[\d .()+-]{6,}")
# 13-19 digits, single spaces or dashes between groups allowed.
_CARD = re.compile(r"(?<![\d.,-])\d(?:[ -]?\d){12,18}(?![\d]|[.,]\d)")
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])")
_SSN = re.compile(r"(?<![\d-])(\d{3})([- ])(\d{2})\2(\d{4})(?![\d-])")
# E.164 with optional single separators, or North American (NPA) NXX-XXXX / NPA-NXX-XXXX.
_PHONE = re.compile(
    r"(?<![\w+])\+[1-9](?:[ .-]?\(?\d\)?){7,14}(?![\w])"
    r"|(?<![\w-])(?:\([2-9]\d{2}\) ?|[2-9]\d{2}[ .-])[2-9]\d{2}[ .-]\d{4}(?![\w-])")
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
                   r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w]|\.\d)")
_V6_SEED = re.compile(r":[0-9A-Fa-f]{0,4}:")
_V6_CHARS = frozenset("0123456789abcdefABCDEF:.")
_JWT = re.compile(r"(eyJ(?<![A-Za-z0-9_-]eyJ)[A-Za-z0-9_-]{8,})\."
                  r"(eyJ[A-Za-z0-9_-]*|[A-Za-z0-9_-]+)\.([A-Za-z0-9_-]*)")
# Issuer prefixes of API keys with their documented shapes.
_KEY_HINTS = ("k_live_", "k_test_", "AKIA", "ASIA", "ghp_", "gho_", "ghu_", "ghs_", "ghr_",
              "github_pat_", "xox", "AIza", "glpat-", "sk-")
_KEY_PREFIXES = re.compile(
    r"(?:"
    r"[sr]k_(?:live|test)_[0-9A-Za-z]{16,}"        # Stripe
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"                   # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{36,}"                  # GitHub tokens
    r"|github_pat_[A-Za-z0-9_]{22,}"
    r"|xox[bpars]-[A-Za-z0-9-]{10,}"                # Slack
    r"|AIza[0-9A-Za-z_-]{35}"                       # Google API key
    r"|glpat-[A-Za-z0-9_-]{20,}"                    # GitLab
    r"|sk-(?:proj-)?[A-Za-z0-9_-]{32,}"             # OpenAI-style
    r")(?![A-Za-z0-9])")
_DIGITS_ONLY = str.maketrans("", "", " -")
# File name suffixes that the address pattern would take for a top-level domain
# ("logo@2x.png"); none is a TLD in use for mail.
_FILE_SUFFIXES = frozenset((
    "png", "jpg", "jpeg", "gif", "svg", "webp", "avif", "ico", "bmp", "tif", "tiff", "css",
    "js", "mjs", "map", "html", "htm", "php", "asp", "aspx", "jsp", "txt", "pdf", "json",
    "xml", "woff", "woff2", "ttf", "otf", "eot", "mp3", "mp4", "webm", "wasm", "gz", "tgz",
    "csv", "md", "yml", "yaml", "lock",
))

# Card brands by IIN prefix: (low, high, prefix length, allowed lengths).
_IIN = (
    (4, 4, 1, (13, 16, 19)),                          # Visa
    (51, 55, 2, (16,)), (2221, 2720, 4, (16,)),       # Mastercard
    (34, 34, 2, (15,)), (37, 37, 2, (15,)),           # American Express
    (6011, 6011, 4, (16, 17, 18, 19)), (644, 649, 3, (16, 17, 18, 19)),
    (65, 65, 2, (16, 17, 18, 19)),                    # Discover
    (3528, 3589, 4, (16, 17, 18, 19)),                # JCB
    (300, 305, 3, (14, 15, 16, 17, 18, 19)), (36, 36, 2, (14, 15, 16, 17, 18, 19)),
    (38, 39, 2, (16, 17, 18, 19)),                    # Diners Club
    (62, 62, 2, (16, 17, 18, 19)),                    # UnionPay
    (50, 50, 2, (12, 13, 14, 15, 16, 17, 18, 19)),    # Maestro
    (56, 58, 2, (12, 13, 14, 15, 16, 17, 18, 19)),
)

# IBAN length by country (ISO 13616 registry).
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22,
    "BH": 22, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28,
    "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20,
    "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24,
    "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SC": 31,
    "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24,
    "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}

# Field names: a password field, or a field whose high-entropy value is taken as a key.
_PASSWORD_NAMES = frozenset(("password", "passwd", "pwd", "secret", "pass", "passphrase"))
_KEY_NAME = re.compile(r"api[_-]?key|apikey|access[_-]?key|secret|token|private[_-]?key"
                       r"|client[_-]?secret|auth[_-]?key", re.I)
_NOT_KEY_NAME = re.compile(r"csrf|xsrf|authenticity", re.I)
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9+/=_.~-]{20,512}\Z")


# -- checks -------------------------------------------------------------------------------

def luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        n = ord(ch) - 48
        if i & 1:
            n *= 2
            if n > 9:
                n -= 9
        total += n
    return total % 10 == 0


def card_ok(text: str) -> bool:
    digits = text.translate(_DIGITS_ONLY)
    n = len(digits)
    if not 12 <= n <= 19 or len(set(digits)) == 1:
        return False
    for low, high, width, lengths in _IIN:
        if n in lengths and low <= int(digits[:width]) <= high:
            return luhn(digits)
    return False


def iban_ok(text: str) -> bool:
    s = text.replace(" ", "")
    if _IBAN_LENGTHS.get(s[:2]) != len(s):
        return False
    moved = s[4:] + s[:4]
    try:
        return int("".join(str(int(ch, 36)) for ch in moved)) % 97 == 1
    except ValueError:
        return False


def ssn_ok(area: str, group: str, serial: str) -> bool:
    a = int(area)
    return a != 0 and a != 666 and a < 900 and group != "00" and serial != "0000"


def _b64json(part: str):
    try:
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        return json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None


def jwt_ok(header: str) -> bool:
    doc = _b64json(header)
    return isinstance(doc, dict) and isinstance(doc.get("alg"), str)


def entropy(text: str) -> float:
    """Shannon entropy in bits per character."""
    n = len(text)
    counts: dict[str, int] = {}
    for ch in text:
        counts[ch] = counts.get(ch, 0) + 1
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def key_like(value: str) -> bool:
    """A token-shaped value of at least 20 characters with the entropy of random bytes:
    >= 3.0 bits a character for hex (at most 4 possible), >= 3.5 for other alphabets."""
    if not _TOKEN_CHARS.match(value) or value.isdigit() or value.isalpha():
        return False
    e = entropy(value)
    if all(c in "0123456789abcdefABCDEF" for c in value):
        return e >= 3.0
    return e >= 3.5


def _ip_ok(text: str) -> bool:
    import ipaddress
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# -- counting ---------------------------------------------------------------------------------

def _blank(text: str, spans: list[tuple[int, int]]) -> str:
    if not spans:
        return text
    parts, last = [], 0
    for start, end in sorted(spans):
        parts.append(text[last:start])
        parts.append(" " * (end - start))
        last = end
    parts.append(text[last:])
    return "".join(parts)


def _emails(text: str):
    """Spans of addresses, found from each "@": a pattern led by a literal is searched
    for in C at memchr speed, one led by a character class is tried at every position."""
    for at in _AT.finditer(text):
        i = at.start()
        local = _LOCAL.search(text, max(0, i - 64), i)
        domain = _DOMAIN.match(text, i + 1)
        if local is None or domain is None:
            continue
        start, end = local.start(), domain.end()
        if start and text[start - 1] in _LOCAL_CHARS:
            continue   # the local part is longer than 64: not an address
        if domain.group().rpartition(".")[2].lower() in _FILE_SUFFIXES:
            continue   # logo@2x.png: a retina asset name, not an address
        yield start, end


def _ipv6(text: str):
    """Spans of IPv6 addresses: each run of hex digits, colons and dots that holds two
    colons in a row or in one group's reach, bounded by non-word characters."""
    seen = -1
    for seed in _V6_SEED.finditer(text):
        if seed.start() < seen:
            continue
        start, end = seed.start(), seed.end()
        while start and text[start - 1] in _V6_CHARS:
            start -= 1
        n = len(text)
        while end < n and text[end] in _V6_CHARS:
            end += 1
        seen = end
        if (start and (text[start - 1].isalnum() or text[start - 1] == "_")) or \
                (end < n and (text[end].isalnum() or text[end] == "_")):
            continue   # part of a word: "std::vector"
        cand = text[start:end].rstrip(".")
        if cand.count(":") >= 2 and any(c.isalnum() for c in cand) and _ip_ok(cand):
            yield start, end


def count_text(text: str, counts: dict[str, int], direction: str, *, ip: bool = True) -> None:
    """Add the pattern types found in text to counts ("type.direction" keys)."""
    if not text:
        return
    spans: list[tuple[int, int]] = []

    def add(kind: str, n: int = 1) -> None:
        key = f"{kind}.{direction}"
        counts[key] = counts.get(key, 0) + n

    if "@" in text:
        for span in _emails(text):
            add("email")
            spans.append(span)
    if "eyJ" in text:
        for m in _JWT.finditer(text):
            if jwt_ok(m.group(1)):
                add("jwt")
                spans.append(m.span())
    if any(p in text for p in _KEY_HINTS):
        for m in _KEY_PREFIXES.finditer(text):
            if m.start() and text[m.start() - 1].isalnum():
                continue
            add("secret")
            spans.append(m.span())
    if _DIGIT.search(text) is None:
        return
    text = _blank(text, spans)
    # IBANs start with a country code and two digits; cards, SSNs, phones and IPv4
    # addresses live in runs of digits and separators. One pass finds both kinds of
    # start, and the exact patterns only look there.
    iban_end = 0
    for run in _RUN.finditer(text):
        r = run.group()
        if r[0] >= "A":   # a country code: the IBAN pattern from here
            at = run.start()
            if at < iban_end or (at and text[at - 1].isalnum()):
                continue
            m = _IBAN.match(text, at)
            if m is not None and iban_ok(m.group()):
                add("iban")
                iban_end = m.end()
            continue
        if run.start() < iban_end:
            continue   # the digits of an IBAN just counted
        spans = []
        if len(r) >= 13:
            for m in _CARD.finditer(r):
                if card_ok(m.group()):
                    add("card")
                    spans.append(m.span())
        if len(r) >= 11 and ("-" in r or " " in r):
            for m in _SSN.finditer(r):
                if ssn_ok(m.group(1), m.group(3), m.group(4)):
                    add("ssn")
                    spans.append(m.span())
        if spans:
            r = _blank(r, spans)
        if len(r) >= 10:
            for m in _PHONE.finditer(r):
                digits = sum(c.isdigit() for c in m.group())
                if 8 <= digits <= 15 or (m.group()[0] != "+" and digits == 10):
                    add("phone")
        if ip and "." in r:
            at0 = run.start()
            for m in _IPV4.finditer(r):
                at = at0 + m.start()
                if at >= 2 and text[at - 1] == "/" and text[at - 2].isalnum():
                    continue   # a product version, "Chrome/120.0.0.0", not an address
                if at and (text[at - 1].isalnum() or text[at - 1] == "_"):
                    continue
                add("ip")
    if ip and ":" in text:
        for _ in _ipv6(text):
            add("ip")


def count_fields(pairs, counts: dict[str, int], direction: str) -> list[str]:
    """Name rules over (name, value) pairs (passwords, key-named secrets); returns the
    values left for the pattern rules."""
    values: list[str] = []
    for name, value in pairs:
        value = value[:MAX_VALUE]
        if name and value:
            last = name.rsplit(".", 1)[-1].lower()
            bare = last.replace("_", "").replace("-", "")
            if last in _PASSWORD_NAMES or "password" in bare or bare in _PASSWORD_NAMES:
                key = f"password.{direction}"
                counts[key] = counts.get(key, 0) + 1
                continue   # a password is counted once, as a password
            if _KEY_NAME.search(last) and not _NOT_KEY_NAME.search(last) \
                    and "eyJ" not in value and not _KEY_PREFIXES.search(value) \
                    and key_like(value):
                key = f"secret.{direction}"
                counts[key] = counts.get(key, 0) + 1
                continue
        values.append(value)
    return values


def _walk(node, name: str, out: list, depth: int) -> None:
    if len(out) >= MAX_VALUES or depth > MAX_DEPTH:
        return
    if isinstance(node, dict):
        for k, v in node.items():
            _walk(v, f"{name}.{k}" if name else str(k), out, depth + 1)
    elif isinstance(node, list):
        for v in node:
            _walk(v, name, out, depth + 1)
    elif isinstance(node, str):
        out.append((name, node))
    elif isinstance(node, int) and not isinstance(node, bool):
        out.append((name, str(node)))   # a card number or phone sent as a JSON number


def _split_args(text: str) -> list[tuple[str, str]]:
    out = []
    for part in text.split("&", MAX_ARGS)[:MAX_ARGS]:
        if part:
            name, eq, value = part.partition("=")
            out.append((unquote_plus(name), unquote_plus(value) if eq else ""))
    return out


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def grpc_messages(body: bytes) -> bytes:
    """The payloads of the uncompressed gRPC messages (1 octet compressed flag, 4 octets
    big-endian length, the message) in a captured body prefix, newline-joined; the last
    may be cut at the capture bound. A protobuf message keeps its strings as plain
    UTF-8, so the text patterns find them; its binary tags and lengths are control
    octets as a rule (a length of 48-57 reads as an ASCII digit before its string: a
    rare miss, never a kept value), and the newline keeps a match from crossing two
    messages. A compressed message is passed over: its octets
    are not its text."""
    out = []
    pos, end = 0, len(body)
    while pos + 5 <= end:
        length = int.from_bytes(body[pos + 1:pos + 5], "big")
        if not body[pos]:
            out.append(body[pos + 5:pos + 5 + length])
        pos += 5 + length
    return b"\n".join(out)


def body_pairs(body: bytes, content_type: str) -> list[tuple[str, str]]:
    """Form fields or JSON leaves as (name, value); any other body as one ("", text)."""
    if not body:
        return []
    text = _text(body)
    ctype = content_type.lower()
    head = text.lstrip()[:1]
    if "json" in ctype or (head in ("{", "[") and "form" not in ctype):
        try:
            doc = json.loads(text)
        except ValueError:
            return [("", text)]   # cut at the capture bound, or not JSON: scan as text
        out: list[tuple[str, str]] = []
        _walk(doc, "", out, 0)
        return out
    if "x-www-form-urlencoded" in ctype or (not ctype and "=" in text and head != "<"):
        return _split_args(text)
    return [("", text)]


@dataclass(frozen=True, slots=True)
class Scanner:
    """The PII settings the HTTP parsers are given (their `pii` option).

    body_bytes: request body prefix captured for counting (form and JSON bodies of methods
    with bodies); response_bytes: prefix of a sampled response body; response_every:
    every Nth eligible response is sampled (1: all of them; 0: none)."""

    body_bytes: int = 8192
    response_bytes: int = DEFAULT_RESPONSE_BYTES
    response_every: int = 1

    def request_body(self, method: str, content_type: str, *, grpc: bool = False) -> int:
        """Bytes of this request body to capture; grpc: the body is gRPC messages
        (HTTP/2), whose protobuf strings are read as text (grpc_messages)."""
        if not self.body_bytes or method in ("GET", "HEAD", "OPTIONS"):
            return 0
        if content_type and not grpc and not _TEXTUAL.search(content_type):
            return 0
        return self.body_bytes

    def response_body(self, content_type: str, seq: int, *, grpc: bool = False) -> int:
        """Bytes of this response body to sample; seq counts the parser's responses."""
        if not self.response_bytes or not self.response_every \
                or not content_type or not (grpc or _TEXTUAL.search(content_type)):
            return 0
        return self.response_bytes if seq % self.response_every == 0 else 0

    def request(self, head: bytes, body: bytes, content_type: str,
                counts: dict[str, int] | None = None) -> dict[str, int]:
        """Counts of one HTTP/1 request: its head (start line and fields) and body prefix."""
        counts = {} if counts is None else counts
        lines = _text(head).split("\n", MAX_VALUES + 1)
        start = lines[0].rstrip("\r").split(" ")
        target = start[1] if len(start) > 1 else ""
        pairs: list[tuple[str, str]] = []
        no_ip: list[str] = []
        path, _, query = target.partition("?")
        if "://" in path:   # absolute form: the authority is the connection's own
            path = "/" + path.split("://", 1)[1].partition("/")[2]
        pairs.append(("", unquote(path)))
        pairs.extend(_split_args(query.partition("#")[0]))
        for line in lines[1:MAX_VALUES]:
            name, colon, value = line.rstrip("\r").partition(":")
            if not colon:
                continue
            name = name.strip().lower()
            value = value.strip(" \t")
            if name == "host" or not value:
                continue
            if name == "user-agent":
                no_ip.append(value[:MAX_VALUE])
            elif name == "authorization" or name == "proxy-authorization":
                # Only the kind of credential is counted: a JWT or a known key prefix.
                scheme, _, cred = value.partition(" ")
                pairs.append(("", cred if cred else scheme))
            elif name == "cookie":
                pairs.extend((n.strip(), v) for n, _, v in
                             (p.partition("=") for p in value.split(";")[:MAX_ARGS]))
            else:
                pairs.append((name, value))
        pairs.extend(body_pairs(body, content_type))
        values = count_fields(pairs[:MAX_VALUES], counts, "request")
        count_text("\n".join(values), counts, "request")
        count_text("\n".join(no_ip), counts, "request", ip=False)
        return counts

    def response(self, body: bytes, content_type: str,
                 counts: dict[str, int] | None = None) -> dict[str, int]:
        """Counts of a sampled response body prefix."""
        return self.body(body, content_type, "response", counts)

    def body(self, body: bytes, content_type: str, direction: str,
             counts: dict[str, int] | None = None, *, grpc: bool = False) -> dict[str, int]:
        """Counts of a captured body prefix alone (HTTP/2 DATA, whose header fields are
        counted apart); grpc: the prefix is gRPC length-prefixed messages."""
        counts = {} if counts is None else counts
        if grpc:
            pairs = [("", _text(grpc_messages(body)))]
        else:
            pairs = body_pairs(body, content_type)
        values = count_fields(pairs[:MAX_VALUES], counts, direction)
        count_text("\n".join(values), counts, direction)
        return counts

    def values(self, pairs, direction: str,
               counts: dict[str, int] | None = None) -> dict[str, int]:
        """Counts of (name, value) pairs (HTTP/2 header fields, decoded query arguments)."""
        counts = {} if counts is None else counts
        values = count_fields(list(pairs)[:MAX_VALUES], counts, direction)
        count_text("\n".join(values), counts, direction)
        return counts


_TEXTUAL = re.compile(r"form|json|xml|text/|javascript", re.I)

REDACTED = "REDACTED"   # sensor/l7/redact.py's marker: one word for "a value was here"


def has_pii(text: str, *, ip: bool = True) -> bool:
    found: dict[str, int] = {}
    count_text(text, found, "request", ip=ip)
    return bool(found)


def scrub_target(target: str) -> str:
    """The request target with every path segment and query value that holds PII replaced
    by REDACTED (and the values of password-named arguments): the record's path field must
    not carry what the counts stand for. Only called when the request counted something."""
    fragment = ""
    hash_at = target.find("#")
    if hash_at >= 0:
        target, fragment = target[:hash_at], target[hash_at:]
    path, qmark, query = target.partition("?")
    segments = path.split("/")
    for i, seg in enumerate(segments):
        if seg and has_pii(unquote(seg)):
            segments[i] = REDACTED
    path = "/".join(segments)
    if qmark:
        parts = query.split("&")
        for i, part in enumerate(parts):
            name, eq, value = part.partition("=")
            plain = unquote_plus(value)
            if eq and value and (count_fields([(unquote_plus(name), plain)], {}, "request")
                                 == [] or has_pii(plain)):
                parts[i] = f"{name}={REDACTED}"
        query = "&".join(parts)
    if fragment and has_pii(unquote(fragment)):
        fragment = "#" + REDACTED
    return path + qmark + query + fragment


class ScanningRegistry:
    """A parser registry whose parsers get the `pii` option (the protocols that registered
    it take it: HTTP/1), wrapping another (the rules stage's, or the plain one)."""

    def __init__(self, base, scanner: Scanner) -> None:
        self.base = base
        self.scanner = scanner

    def create(self, name: str, **options):
        options.setdefault("pii", self.scanner)
        return self.base.create(name, **options)

    def __getattr__(self, name: str):
        return getattr(self.base, name)
