"""XSS, path traversal / local file inclusion, scanner and protocol-anomaly detectors.

XSS: what a browser executes is a tag, an event-handler attribute or a script URL. Those
are matched as shapes (a `<` then a tag name then, somewhere before `>`, an on...=
attribute; a scheme `javascript:` after the whitespace, control characters and comments a
browser ignores are removed), not as a word list, so "BLAH <A HREF=foo.html>" passes.

Traversal / LFI: `..` followed by a path separator in any spelling, well-known system
files, PHP stream wrappers, and requests for restricted files: hidden files or folders
(a path segment starting with "." other than .well-known), backups, dumps and logs.

Every regex here is a plain alternation or a bounded class repetition: no nested
quantifiers, so Python's `re` cannot backtrack catastrophically on them.
"""

from __future__ import annotations

import re

# -- XSS ---------------------------------------------------------------------------------

_COMMENT = re.compile(r"/\*.{0,256}?\*/", re.S)
_TAGS = ("script", "iframe", "frame", "frameset", "object", "embed", "applet", "svg",
         "math", "meta", "base", "link", "style", "form", "isindex", "xss", "xml",
         "import", "animate", "set", "handler", "listener", "template", "portal", "video",
         "audio", "source", "marquee", "bgsound", "layer", "ilayer", "vmlframe", "plaintext",
         "xmp", "img", "image", "body", "input", "button", "textarea", "select", "details",
         "keygen", "a", "div", "span", "table", "td", "html", "title", "noscript")
_DANGEROUS_TAG = re.compile(
    r"<\s*/?\s*(?:script|iframe|frame|frameset|object|embed|applet|meta|base|isindex|"
    r"vmlframe|xss|import|handler|listener|portal|plaintext|xmp|bgsound|layer|ilayer|"
    r"svg|math|style|link|xml|set|animate|xi:include)\b|\bxi:include\b"
    r"|<[a-z][\w:-]*\s[^>]{0,256}\bxmlns(?::\w+)?\s*=", re.I)
_HANDLER = re.compile(r"<[a-z!/?][^>]{0,512}?[\s\"'/;]on[a-z]{3,24}\s*=", re.I | re.S)
_ATTR_BREAK = re.compile(
    r"[\"'`]\s*/?\s*on[a-z]{3,40}\s*=|^\s*on[a-z]{3,40}\s*=\s*\S|^\s+on[a-z]{3,40}\s*=", re.I)
_SCHEME = re.compile(r"(?:javascript|vbscript|livescript|jscript|mocha):"
                     r"|data:(?:text/html|image/svg|application/x?html)", re.I)
_ATTRS = re.compile(r"<[a-z][^>]{0,512}?\b(?:src|href|action|formaction|data|srcdoc|style|"
                    r"background|dynsrc|lowsrc|xlink:href|poster|code|codebase|values|from|to|"
                    r"by|attributename)\s*=", re.I | re.S)
_JS_SINKS = re.compile(
    r"\b(?:document\s*\.\s*(?:cookie|domain|write|writeln|location|body\.innerhtml)|"
    r"window\s*\.\s*(?:location|open|name)|(?:alert|prompt|confirm|eval|settimeout|"
    r"setinterval|fromcharcode|execscript)\s*(?:\(|`)|\.innerhtml\s*=|string\s*\.\s*"
    r"fromcharcode|top\s*\[|self\s*\[|-moz-binding|expression\s*\(|behavior\s*:\s*url|"
    r"constructor\s*\(|\bimport\s*\(|location\s*=|location\.hash|\bnew\s+function\b|"
    r"<!entity|<!doctype\s+\w+\s*\[|binding\s*:\s*url\s*\(|document\s*\)?\s*\[\s*[\"'`]|"
    r"\.\s*(?:call|apply)\s*`|\breflect\s*\.\s*(?:apply|construct)\b|\$\{\s*alert\b|"
    r"(?:!\[\]|\+\[\]|\[\]\[){3}|!entity\s+%?\s*\w+\s+system\b)", re.I)
_SQUEEZE = re.compile(r"[\s\x00-\x1f\\]+")


def xss(value: str) -> str:
    """Why value looks like cross-site scripting, or ""."""
    if len(value) < 4:
        return ""
    v = value
    if "/*" in v:
        v = _COMMENT.sub("", v)
    if "<" in v:
        m = _DANGEROUS_TAG.search(v)
        if m:
            return "tag " + m.group(0).lstrip("<").strip().lower()
        if _HANDLER.search(v):
            return "event handler"
    if "on" in v.lower() and _ATTR_BREAK.search(v):
        return "attribute break into handler"
    squeezed = _SQUEEZE.sub("", v) if ":" in v else v
    if ":" in squeezed and _SCHEME.search(squeezed):
        if "<" in v and _ATTRS.search(v) or re.search(r"(?:^|[\"'=(\s])(?:java|vb|live|j)script:",
                                                      squeezed, re.I) or \
                squeezed.lower().startswith(("javascript:", "vbscript:", "data:")):
            return "script URL"
        return "script URL"
    m = _JS_SINKS.search(_COMMENT.sub("", value) if "/*" in value else v)
    if m:
        return "script sink " + m.group(0).strip().lower()[:24]
    if v.count("[]") >= 6 and ("![]" in v or "+[]" in v):
        return "JSFuck-style script"   # code spelled with [] ! + only
    return ""


# -- traversal / LFI ---------------------------------------------------------------------

_TRAVERSAL = re.compile(r"(?:^|[/\\;=:\s\"'])\.{2,3}[/\\;](?:[\w.]|$)|\.\.\.+[/\\]|%(?:c0%af|c1%9c|"
                        r"e0%80%af)", re.I)
_SYSFILES = re.compile(
    r"(?:^|[/\\])(?:etc[/\\](?:passwd|shadow|group|master\.passwd|hosts|issue|"
    r"sudoers|crontab|fstab|hostname|resolv\.conf|ssh/)|proc[/\\](?:self|version|"
    r"cpuinfo|meminfo|interrupts|mounts|net|\d+)|sys[/\\](?:class|kernel|devices|block|"
    r"module|firmware|fs|bus)|windows[/\\](?:win\.ini|system32|system\.ini)|"
    r"boot\.ini|winnt[/\\]|inetpub[/\\]|var[/\\]log[/\\]|root[/\\]\.|"
    r"\.ssh[/\\]|id_(?:rsa|dsa|ecdsa|ed25519)\b|\.aws[/\\]|\.kube[/\\]|"
    r"\.docker[/\\]config|\.npmrc|\.netrc|\.pgpass|\.my\.cnf|\.bash_history|\.zsh_history|"
    r"wp-config\.php|web\.config|\.htaccess|\.htpasswd|\.git[/\\]|\.svn[/\\]|\.hg[/\\]|"
    r"\.env\b|\.ds_store)", re.I)
_WRAPPERS = re.compile(r"\b(?:php|file|zip|phar|expect|glob|data|ogg|rar|zlib|compress\.zlib|"
                       r"compress\.bzip2|jar|netdoc)://", re.I)
_DEVSERVER = re.compile(r"^/@(?:fs|id)/", re.I)   # dev servers that serve any file by path
_HIDDEN = re.compile(r"(?:^|/)\.(?!well-known/)[a-z0-9_][\w.-]*(?:/|$)", re.I)
_RESTRICTED_EXT = re.compile(
    r"\.(?:log|sql|bak|backup|old|orig|swp|swo|save|tmp|dump|db|sqlite|sqlite3|mdb|"
    r"pem|key|p12|pfx|jks|kdbx|ini|conf|cfg|env|yml|yaml|toml|properties)"
    r"(?:\.(?:zip|gz|tgz|bz2|xz|7z|rar|tar))?$|~$", re.I)


def traversal(value: str) -> str:
    """Why value (a decoded parameter, header or body value) names files it should not."""
    if len(value) < 3:
        return ""
    if "." in value:
        m = _TRAVERSAL.search(value)
        if m:
            return "path traversal"
    m = _SYSFILES.search(value)
    if m and ("/" in value or "\\" in value):
        return "system file " + m.group(0).strip("/\\")[:32]
    if "://" in value:
        m = _WRAPPERS.search(value)
        if m:
            return "stream wrapper " + m.group(0)
    return ""


# Every check below needs one of these: most paths (/api/v1/users/42) are passed on it.
_PATH_SUSPECT = re.compile(r"[.@\\:~%]|/(?:etc|proc|sys|windows|winnt|boot|var|root|inetpub)"
                           r"(?:/|$)", re.I)


def restricted_path(path: str) -> str:
    """Why a request path (decoded, no query) asks for a restricted file, or ""."""
    if not _PATH_SUSPECT.search(path):
        return ""
    if _DEVSERVER.match(path):
        return "dev server file access"
    why = traversal(path)
    if why:
        return why
    last = path.rsplit("/", 1)[-1]
    if _HIDDEN.search(path):
        return "hidden file or folder"
    if last and _RESTRICTED_EXT.search(last) and not last.startswith("."):
        return "restricted file type"
    return ""


# -- scanners ----------------------------------------------------------------------------

# Security scanners and attack tools that announce themselves (lower case substrings).
SCANNER_AGENTS = (
    "nessus", "nikto", "sqlmap", "nmap", "nuclei", "havij", "acunetix", "netsparker",
    "w3af", "openvas", "qualys", "burp", "zaproxy", "owasp zap", "wpscan", "joomscan",
    "dirbuster", "dirb/", "gobuster", "feroxbuster", "ffuf", "wfuzz", "masscan", "zgrab",
    "arachni", "skipfish", "whatweb", "appscan", "webinspect", "paros", "grabber",
    "nstealth", "brutus", "hydra", "medusa", "commix", "jaeles", "xsstrike", "dalfox",
    "httpx - open-source", "interactsh", "fimap", "bbqsql", "jbrofuzz", "webshag",
    "pangolin", "vega/", "morfeus", "zmeu", "muieblackcat", "blackwidow", "w3af.org",
    "metasploit", "struts-pwn", "detectify",
)
_SCANNER_PATHS = re.compile(r"(?:^|/)(?:nessus|nikto|acunetix|netsparker|sqlmap|w3af|"
                            r"appscan|qualys)[\w.-]*", re.I)


_AGENTS = re.compile("|".join(re.escape(n) for n in SCANNER_AGENTS), re.I)


def scanner_agent(ua: str) -> str:
    m = _AGENTS.search(ua)
    return m.group(0).lower().strip("/ ") if m else ""


def scanner_request(path: str, header_names: list[str]) -> tuple[str, str]:
    """(field, reason) of a scanner's own probe path or a header only scanners send."""
    if _SCANNER_PATHS.search(path):
        return "path", "scanner probe path"
    for name in header_names:
        if name.startswith(("x-scanner", "x-scan-", "acunetix-", "x-wipp", "x-request-memo")):
            return "header:" + name, "scanner header " + name
    return "", ""
