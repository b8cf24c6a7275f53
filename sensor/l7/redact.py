"""Secrets never leave the parser: redaction of request targets and Host values.

What is redacted (on by default; Http1Parser(redact=False) turns it off for lab use):
- the password of URL userinfo (`http://user:pw@host/` -> `http://user:REDACTED@host/`);
- the value of any query or path (`;name=value`) parameter whose name looks sensitive: the
  name is percent-decoded, lower-cased, stripped of everything but letters and digits,
  and matched when it equals or ends with one of SENSITIVE_NAMES (so `client_secret`,
  `X-Api-Key`, `refresh_token` and `JSESSIONID` all match). Matching by suffix errs on
  the side of hiding a harmless value rather than leaking a secret.
Header values such as Authorization, Proxy-Authorization, Cookie and Set-Cookie are never
copied into any record field at all, with or without redaction.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

REDACTED = "REDACTED"

# Normalised (letters and digits only, lower case) names whose values are credentials.
SENSITIVE_NAMES = (
    "password", "passwd", "pwd", "token", "secret", "apikey", "accesstoken", "auth",
    "session", "sessionid", "sid", "key", "signature", "credential", "credentials",
)

_NON_ALNUM = re.compile(r"[^0-9a-z]+")
# `;name=value` path parameters (RFC 3986 §3.3), e.g. ;jsessionid=...
_PATH_PARAM = re.compile(r";([^/;?#=]*)=([^/;?#]*)")


def sensitive(name: str) -> bool:
    if "%" in name or "+" in name:
        name = unquote_plus(name)
    norm = name.lower()
    if not norm.isalnum():
        norm = _NON_ALNUM.sub("", norm)
    return bool(norm) and norm.endswith(SENSITIVE_NAMES)


def _redact_params(query: str) -> str:
    parts = query.split("&")
    changed = False
    for i, part in enumerate(parts):
        name, eq, _ = part.partition("=")
        if eq and sensitive(name):
            parts[i] = f"{name}={REDACTED}"
            changed = True
    return "&".join(parts) if changed else query


def _path_param(match: re.Match[str]) -> str:
    if sensitive(match.group(1)):
        return f";{match.group(1)}={REDACTED}"
    return match.group(0)


def redact_target(target: str) -> str:
    """A request target with userinfo passwords and sensitive parameter values hidden."""
    if "@" not in target and "?" not in target and ";" not in target:
        return target  # the common case costs three scans, no allocation
    fragment = ""
    hash_at = target.find("#")
    if hash_at >= 0:
        target, fragment = target[:hash_at], target[hash_at:]
    path, qmark, query = target.partition("?")
    scheme_end = path.find("://")
    if scheme_end >= 0:
        auth_start = scheme_end + 3
        slash = path.find("/", auth_start)
        auth_end = slash if slash >= 0 else len(path)
        path = path[:auth_start] + redact_authority(path[auth_start:auth_end]) + path[auth_end:]
    elif "@" in path and "/" not in path:
        path = redact_authority(path)  # authority-form (CONNECT host:port)
    if ";" in path:
        path = _PATH_PARAM.sub(_path_param, path)
    if qmark:
        query = _redact_params(query)
        if fragment:
            fragment = "#" + _redact_params(fragment[1:])
    return path + qmark + query + fragment


def redact_authority(authority: str) -> str:
    """`user:password@host` -> `user:REDACTED@host`."""
    at = authority.rfind("@")
    if at < 0:
        return authority
    user, colon, _ = authority[:at].partition(":")
    if not colon:
        return authority
    return f"{user}:{REDACTED}{authority[at:]}"


def strip_userinfo(host: str) -> str:
    """A Host value never carries userinfo (RFC 9110 §7.2); drop any that is there."""
    at = host.rfind("@")
    return host[at + 1:] if at >= 0 else host
