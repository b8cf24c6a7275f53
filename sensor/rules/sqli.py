"""SQL injection: a tokenizer and token-class fingerprints, in the manner libinjection
describes (tokenize the input as SQL, reduce it to a short string of token classes, judge
the shape), with our own token classes and our own shape rules, plus a few patterns.

Why shapes and not keywords: "select" or "union" in prose is harmless; what an injection
needs is SQL *syntax* right where the application's own query continues: a closing quote
followed by a boolean operator, a number followed by UNION SELECT, a statement break
followed by a new statement. The input is tokenized three times: as it stands (a numeric
or bare context), and as if the application had already opened a single or a double
quote before it (a string context). A string context starts by closing that quote.

Token classes (one character each, so a fingerprint is a short string):
  s string   n number/NULL/TRUE   b bare word   v @variable   f function (word before "(")
  k keyword  U UNION   E statement word (SELECT, INSERT, DROP, ...)   & AND/OR/XOR/&&/||
  o operator (=, <, LIKE, IN, ...)   c comment   ( ) , ; .   ? anything else

Everything is linear in the input and bounded by MAX_TOKENS.
"""

from __future__ import annotations

import re

MAX_TOKENS = 48

_E = frozenset(("select", "insert", "update", "delete", "drop", "create", "alter",
                "truncate", "exec", "execute", "declare", "shutdown", "grant", "revoke",
                "rename", "merge", "call", "handler"))
_LOGIC = frozenset(("and", "or", "xor"))
_OPWORDS = frozenset(("like", "rlike", "regexp", "is", "in", "between", "div", "mod",
                      "sounds", "collate", "not", "glob", "similar", "ilike", "notnull",
                      "isnull"))
_KEYWORDS = frozenset(("from", "where", "order", "group", "by", "having", "limit",
                       "offset", "into", "values", "table", "join", "waitfor", "delay",
                       "procedure", "case", "when", "then", "else", "end", "as", "distinct",
                       "all", "top", "outfile", "dumpfile", "set", "exists", "database",
                       "schema", "column", "asc", "desc", "union", "cross", "inner", "outer",
                       "left", "right", "on", "using"))
_LITERALS = frozenset(("null", "true", "false"))
# Keywords that continue a query right after a closed string or a number.
_CONTINUE = frozenset(("order", "group", "having", "limit", "into", "procedure", "where",
                       "waitfor", "from", "offset", "collate"))
# Functions an application never needs from user input, but an attacker needs all the time:
# timing oracles, file access, error-based extraction, system catalogs.
_STRONG_FUNCS = frozenset((
    "sleep", "benchmark", "pg_sleep", "load_file", "extractvalue", "updatexml",
    "xp_cmdshell", "randomblob", "sys_eval", "sys_exec", "pg_read_file", "utl_inaddr",
    "dbms_pipe", "receive_message", "get_host_address", "name_const", "exp", "geometrycollection",
    "polygon", "multipoint", "linestring", "multilinestring", "multipolygon", "json_keys",
    "group_concat", "concat_ws", "make_set", "elt", "sqlite_version", "version",
    "database", "schema", "current_database", "user_name", "system_user", "session_user",
    "char", "chr", "unhex", "ascii", "ord", "substring", "substr", "mid", "hex",
    "if", "ifnull", "nullif", "iif", "coalesce", "cast", "convert", "count", "concat",
    "length", "len", "md5", "sha1", "row_count", "found_rows", "rand", "floor",
    "dbms_xmlgen", "xmltype", "ctxsys", "utl_http", "sysdate", "now", "instr", "locate",
    "position", "reverse", "lower", "upper", "trim", "replace", "left", "right",
    "is_srvrolemember", "db_name", "object_id", "openrowset", "opendatasource",
    "pg_user", "current_setting", "query_to_xml", "lo_import", "copy", "string_agg",
    "lo_get", "lo_export", "lo_from_bytea", "pg_ls_dir", "pg_read_binary_file",
))
_CATALOGS = ("information_schema", "sysobjects", "syscolumns", "pg_catalog", "pg_shadow",
             "sqlite_master", "mysql.user", "all_tables", "user_tables", "msysaccessobjects",
             "sys.tables", "sys.objects", "sysibm", "v$version", "dual")

_PG_TYPES = frozenset(("int", "integer", "bigint", "smallint", "text", "varchar", "numeric",
                       "bool", "boolean", "regclass", "oid", "bytea", "json", "jsonb", "float",
                       "real", "date", "timestamp", "char", "inet", "money", "xml", "int4",
                       "int8", "name"))
# Identifiers that exist only in SQL dialects: packages, row-set functions, N-types.
_SQL_ONLY = frozenset(("utl_http", "utl_inaddr", "utl_file", "utl_smtp", "openrowset",
                       "opendatasource", "openquery", "dbms_pipe", "dbms_lock", "dbms_xmlgen",
                       "nvarchar", "sp_executesql", "xp_cmdshell", "pg_sleep", "sqlite_master",
                       "information_schema", "sysobjects", "syscolumns"))
# SQL operators that mean nothing outside SQL when they make up a whole value.
_BARE_OPERATORS = frozenset(("<=>", "<>", "!=", "||", "&&", "==", ">=", "<=", ">>", "<<",
                             "xor", "rlike", "regexp", "sounds like", "not like", "ilike",
                             "not regexp", "not rlike"))
# Function names that also occur in code snippets, spreadsheets and prose.
_PROSE_FUNCS = frozenset(("left", "right", "lower", "upper", "trim", "replace", "reverse",
                          "count", "length", "len", "now", "position", "copy", "floor",
                          "rand", "if", "version", "char", "exp"))
# Stored procedures attackers call (xp_/sp_ prefixes taken off).
_PROCS = frozenset(("cmdshell", "password", "executesql", "oacreate", "oamethod",
                    "makewebtask", "regread", "regwrite", "dirtree", "fileexist",
                    "addextendedproc", "configure", "addlogin", "addsrvrolemember",
                    "servicecontrol", "availablemedia", "execresultset", "prepare", "execute"))
_WORD_START = frozenset("abcdefghijklmnopqrstuvwxyz_$")
_WORD = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_$")
_DIGITS = frozenset("0123456789")
_OPS2 = ("<=>", "<>", "!=", "<=", ">=", ":=", "||", "&&", "!<", "!>")
_OPCHARS = frozenset("=<>!+-*/%^|&~")


class Token:
    __slots__ = ("kind", "text", "open")

    def __init__(self, kind: str, text: str, open: str = "") -> None:
        self.kind = kind
        self.text = text
        self.open = open   # the quote of a string the input leaves unterminated

    def __repr__(self) -> str:
        return f"{self.kind}:{self.text}"


def tokenize(value: str, quote: str = "") -> list[Token]:
    """Tokens of value, lower-cased, as if `quote` had been opened before it."""
    s = value.lower()
    n = len(s)
    out: list[Token] = []
    i = 0
    if quote:
        end = _string_end(s, 0, quote)
        if end < 0:
            return []   # the quote never closes: all of it is string data
        out.append(Token("s", s[:end]))
        i = end + 1
    while i < n and len(out) < MAX_TOKENS:
        ch = s[i]
        if ch in " \t\r\n\v\f\xa0" or ord(ch) < 32:
            i += 1
            continue
        if ch == "/" and s.startswith("/*", i):
            if s.startswith("/*!", i):
                # MySQL executable comment: its content is code.
                i += 3
                while i < n and s[i] in _DIGITS:
                    i += 1
                continue
            end = s.find("*/", i + 2)
            out.append(Token("c", s[i:end + 2 if end >= 0 else n]))
            i = end + 2 if end >= 0 else n
            continue
        if ch == "*" and s.startswith("*/", i):
            i += 2     # the end of an executable comment
            continue
        if (ch == "-" and s.startswith("--", i)) or ch == "#":
            end = s.find("\n", i)
            out.append(Token("c", s[i:end if end >= 0 else n]))
            i = end + 1 if end >= 0 else n
            continue
        if ch in "'\"":
            end = _string_end(s, i + 1, ch)
            out.append(Token("s", s[i + 1:end if end >= 0 else n], ch if end < 0 else ""))
            i = end + 1 if end >= 0 else n
            continue
        if ch == "`":
            end = s.find("`", i + 1)
            out.append(Token("b", s[i + 1:end if end >= 0 else n]))
            i = end + 1 if end >= 0 else n
            continue
        if ch in _DIGITS or (ch == "." and i + 1 < n and s[i + 1] in _DIGITS):
            j = i + 1
            while j < n and (s[j] in _DIGITS or s[j] in ".xabcdef" and s[i] == "0"
                             or s[j] == "."):
                j += 1
            if j < n and s[j] in "e" and j + 1 < n and s[j + 1] in _DIGITS:
                j += 2
                while j < n and s[j] in _DIGITS:
                    j += 1
            if j < n and s[j] in _WORD_START:
                # "5eor", "3rd": a word that starts with digits, not a number.
                while j < n and s[j] in _WORD:
                    j += 1
                out.append(Token("b", s[i:j]))
            else:
                out.append(Token("n", s[i:j]))
            i = j
            continue
        if ch == "@":
            j = i + 1
            while j < n and (s[j] == "@" or s[j] in _WORD):
                j += 1
            out.append(Token("v", s[i:j]))
            i = j
            continue
        if ch in _WORD_START or ord(ch) > 127:
            j = i + 1
            while j < n and (s[j] in _WORD or ord(s[j]) > 127):
                j += 1
            word = s[i:j].rstrip(".")
            j = i + len(word) if word else j
            out.append(Token(_word_kind(s, word, j), word))
            i = j
            continue
        op = next((o for o in _OPS2 if s.startswith(o, i)), "")
        if op:
            out.append(Token("&" if op in ("||", "&&") else "o", op))
            i += len(op)
            continue
        if ch in _OPCHARS:
            out.append(Token("o", ch))
        elif ch in "(),;.":
            out.append(Token(ch, ch))
        else:
            out.append(Token("?", ch))
        i += 1
    return out


def _string_end(s: str, i: int, quote: str) -> int:
    """Index of the quote that closes a string starting at i (doubled quotes and
    backslash escapes stay inside), or -1."""
    n = len(s)
    while i < n:
        ch = s[i]
        if ch == "\\":
            i += 2
            continue
        if ch == quote:
            if i + 1 < n and s[i + 1] == quote:
                i += 2
                continue
            return i
        i += 1
    return -1


def _word_kind(s: str, word: str, j: int) -> str:
    k = j
    n = len(s)
    while k < n and s[k] in " \t\r\n":
        k += 1
    if word in _LOGIC:
        return "&"
    if word in _LITERALS:
        return "n"
    if k < n and s[k] == "(" and word not in _OPWORDS and word not in _E \
            and word not in ("from", "where", "values", "as", "on", "using", "into", "exists"):
        return "f"
    if word == "union":
        return "U"
    if word in _E:
        return "E"
    if word in _OPWORDS:
        return "o"
    if word in _KEYWORDS:
        return "k"
    return "b"


def fingerprint(tokens: list[Token], size: int = 8) -> str:
    return "".join(t.kind for t in tokens[:size])


_COMPARE = frozenset(("=", "<", ">", "<>", "!=", "<=", ">=", "<=>", "like", "rlike",
                      "regexp", "is", "in", "between", "sounds", "glob", "ilike"))
_ARITH = frozenset(("+", "-", "*", "/", "%", "^", "|", "&", "||", "div", "mod"))


def _strong(toks: list[Token]) -> bool:
    """Evidence of SQL that prose does not produce by accident."""
    for j, t in enumerate(toks):
        k = t.kind
        if k in "UEv" or k == "f" and t.text in _STRONG_FUNCS:
            return True
        if k == ";" and j + 1 < len(toks) and toks[j + 1].kind in "Ec":
            return True
        if k == "c" and t.text.startswith(("--", "#", "/*")) and len(t.text.strip()) <= 4:
            return True   # a bare comment marker, not "-- 10 DIGITAL PAPERS" in prose
        if k == "o" and t.text in _COMPARE and 0 < j < len(toks) - 1 \
                and toks[j - 1].kind in "nsv)" and toks[j + 1].kind in "nsv(f":
            return True
    return False


def _operand_then(toks: list[Token], i: int, strict: bool = False) -> bool:
    """toks[i] is an operand that makes a complete boolean or comparison: followed by a
    comparison, or a function call, or a literal that ends the input (the application
    supplies the rest: `' or '1`)."""
    n = len(toks)
    if i >= n:
        return False
    t = toks[i]
    nxt = toks[i + 1] if i + 1 < n else None
    if t.kind == "f" or t.kind == "(":
        return True
    if t.kind in "nsvb" and nxt is not None and nxt.kind == "o" and (
            nxt.text in _COMPARE or not strict and nxt.text in _ARITH and (
                t.kind in "nsv" or i + 2 < n and toks[i + 2].kind in "ns")):
        return True
    if t.kind in "ns" and (nxt is None and not strict or nxt is not None and nxt.kind in "c;") \
            and (t.kind == "n" or t.text or i == 2 and not toks[0].text):
        return True
    if t.kind == "o" and t.text in ("not", "!", "-", "+", "~") and i + 1 < n \
            and toks[i + 1].kind in "nsvf(o":
        return _operand_then(toks, i + 1, strict)
    return False


def _after_break(toks: list[Token], i: int, strict: bool = False, quote: str = "") -> str:
    """Why the tokens from i on continue a query the input broke into ("" if not).
    strict: a bare number came before (numeric context), where "1950 or 1960" and
    "909-527-9247" are common: an operand alone or arithmetic on numbers is not enough."""
    n = len(toks)
    while i < n and toks[i].kind == ")":
        i += 1
    if i >= n:
        return ""
    t = toks[i]
    nxt = toks[i + 1] if i + 1 < n else None
    k = t.kind
    if k == "&":
        if _operand_then(toks, i + 1, strict):
            return "boolean"
        if not strict and toks[-1].kind == "c" and toks[-1].text.startswith(("--", "#")) \
                and any(x.kind in "on" for x in toks[i + 1:-1]):
            return "boolean"   # `x' or array[id] is not null--`
        return ""
    if k == "o":
        if nxt is None:
            return ""
        if not strict and _strong(toks[i + 1:]):
            return "operator"
        j = i + 1
        while j < n - 1 and toks[j].kind == "o" and (toks[j].text.isalpha() or
                                                     toks[j].text in ("+", "-", "!")):
            j += 1    # `not like`, `sounds like`, `regexp +`: one operator
        if j > i + 1:
            nxt = toks[j]
            if nxt.kind == "s" and nxt.open == quote and j == n - 1 and quote:
                return "comparison"   # `' not like '`: the application closes the quote
        if t.text == "is" and nxt.text == "not" and i + 2 < n:
            nxt = toks[i + 2]
        if t.text in _COMPARE and t.text != "in" and nxt.kind in "nsvf(":
            if t.text.isalpha() and not _strong(toks[i:]) and nxt.kind not in "nsf(":
                return ""
            return "comparison"
        if t.text in _ARITH and (nxt.kind in "fv(" or nxt.kind == "n" and not strict and (
                i + 2 >= n or toks[i + 2].kind in "c&;o")):
            return "operator"
        if t.text in _ARITH and toks[-1].kind == "s" and toks[-1].open == quote and all(
                x.kind == "o" for x in toks[i + 1:-1]) and len(toks) - i <= 3:
            return "operator"   # `a' ^ 'b`, `' - '`: the application closes the last quote
        if not strict and n - i >= 4 and toks[-1].kind == "s" and toks[-1].open == quote \
                and toks[-2].kind == "o" and t.text in _ARITH and n - i <= 6:
            return "operator"   # `1' * id - '0`
        return ""
    if k == ";":
        return "stacked" if nxt is None or nxt.kind in "Ec" or nxt.text in (
            "waitfor", "if", "begin", "declare") else ""
    if k == "c" and t.text.startswith(("--", "#", "/*")):
        return "comment"
    if k == "U" and nxt is not None and (nxt.kind in "E(" or nxt.text in ("all", "distinct") or
                                         nxt.kind == "n" and i + 2 < n and toks[i + 2].kind == ","):
        return "union"
    if k == "E" and nxt is not None and _anywhere(toks[i:]):
        return "statement"
    if k in "UE" and i == 1 and not toks[0].text and toks[0].kind == "s" and (
            nxt is None or nxt.kind in "bnv(ko"):
        return "statement"    # the value opens with a quote and a statement word
    if k == "k" and nxt is not None:
        w = t.text
        if (w in ("order", "group") and nxt.text == "by") or (
                w == "into" and nxt.text in ("outfile", "dumpfile") or nxt.kind == "v") or (
                w in ("having", "where") and _operand_then(toks, i + 1, strict=True)) or (
                w == "limit" and nxt.kind == "n") or (
                w in ("procedure", "waitfor") and nxt.kind in "fk"):
            return "clause"
    if k == "f" and t.text in _STRONG_FUNCS:
        return "function"
    return ""


def _anywhere(toks: list[Token]) -> str:
    """Shapes that are SQL wherever they appear in the input."""
    n = len(toks)
    for i, t in enumerate(toks):
        k = t.kind
        if k == "U":
            j = i + 1
            if j < n and toks[j].text in ("all", "distinct"):
                j += 1
            while j < n and toks[j].kind in "(c":
                j += 1
            if j < n and toks[j].kind == "E":
                return "union select"
        elif k == "E":
            w = t.text
            rest = [r for r in toks[i + 1:i + 24] if r.kind != "c"][:18]
            texts = [r.text for r in rest]
            if w == "select" and "from" in texts[:16]:
                lst = rest[:texts.index("from")]
                if lst and any(r.kind in "fvn,o?" or r.text == "*" for r in lst):
                    return "select from"
            if w == "select" and rest and (rest[0].kind in "fvn" and (
                    len(rest) == 1 or rest[1].kind in "o,)c(;&.") or rest[0].kind == "("
                    or rest[0].text in _STRONG_FUNCS and rest[0].text not in _PROSE_FUNCS):
                return "select expression"
            if w == "select" and "from" in texts[:4] and texts.index("from") + 1 < len(rest):
                j = texts.index("from")
                target = rest[j + 1]
                ident = rest[0].kind == "b" and ("_" in rest[0].text or "_" in target.text)
                if target.kind == "b" and (ident or target.text.startswith(_CATALOGS) or
                                           texts[j + 2:j + 3] in (["where"], ["limit"],
                                                                  ["order"], ["group"])):
                    return "select from"
            if w == "insert" and "into" in texts[:2]:
                return "insert into"
            if w == "delete" and texts[:1] == ["from"]:
                return "delete from"
            if w in ("drop", "create", "alter", "truncate") and texts[:1] and \
                    texts[0] in ("table", "database", "schema", "user", "procedure",
                                 "function", "view", "index", "trigger"):
                return w + " " + texts[0]
            if w == "update" and len(texts) >= 2 and texts[1] == "set":
                return "update set"
            if w in ("exec", "execute") and rest and (
                    rest[0].text.startswith(("xp_", "sp_", "master")) or rest[0].kind in "(s"):
                return "exec"
            if w == "shutdown" and (i == 0 or toks[i - 1].kind in ";c"):
                return "shutdown"
            if w == "declare" and rest and rest[0].kind == "v":
                return "declare"
            if w in ("drop", "truncate", "alter") and len(rest) >= 2 and rest[0].kind == "b" \
                    and rest[1].kind == ";" and len(toks) - i <= 6:
                return w + " statement"
        elif k == "f" and t.text in _STRONG_FUNCS and t.text not in _PROSE_FUNCS:
            # A strong function with an argument list that looks like SQL.
            if i + 2 < n and toks[i + 2].kind in "nsvfEb(":
                return "function " + t.text
        elif k == "(" and i + 1 < n and toks[i + 1].kind == "E" and toks[i + 1].text in (
                "select", "exec", "execute") and i + 2 < n:
            return "subquery"
        elif k == ")" and i + 3 < n and toks[i + 1].text == "as" and toks[i + 2].kind == "b" \
                and toks[i + 3].text == "from":
            return "subquery alias"
        elif k == "k" and t.text == "procedure" and i + 1 < n and toks[i + 1].kind in "fb" \
                and toks[i + 1].text.startswith("analyse"):
            return "procedure analyse"
        elif k == "b" and t.text.startswith(("xp_", "sp_")) and t.text[3:] in _PROCS:
            return "stored procedure"
        elif k == "&" and i + 3 < n and toks[i + 1].kind in "ns" and toks[i + 2].kind == "o" \
                and toks[i + 2].text in _COMPARE and toks[i + 3].kind in "ns":
            return "boolean comparison"
        elif k == "o" and t.text == "=" and 0 < i < n - 1 and toks[i - 1].kind in "ns" \
                and toks[i + 1].kind == toks[i - 1].kind \
                and toks[i + 1].text == toks[i - 1].text and (i == 1 or toks[i - 2].kind in ",&("):
            return "tautology"
        elif k == "?" and t.text == ":" and i + 2 < n and toks[i + 1].text == ":" \
                and toks[i + 2].text in _PG_TYPES:
            return "postgres cast"
        elif k == "v" and t.text.startswith("@@"):
            return "system variable"
        elif k == "k" and t.text == "waitfor" and i + 1 < n and toks[i + 1].text in (
                "delay", "time"):
            return "waitfor"
        elif k == "k" and t.text == "into" and i + 1 < n and toks[i + 1].text in (
                "outfile", "dumpfile"):
            return "into outfile"
        elif k == "b" and (t.text.startswith(_CATALOGS) and n > 1 or t.text in _SQL_ONLY):
            return "catalog"
        elif k == ";" and i + 1 < n and toks[i + 1].kind == "E" and i + 2 < n:
            return "stacked statement"
    return ""


# A value of only words, digits, spaces and . : + - (no quote, bracket, operator,
# comment or statement break) can only be SQL by its words: these are the ones some
# shape above needs. Anything else is tokenized. The prefilter is what keeps ordinary
# values (names, ids, dates, prose) at a regex search each.
_PLAIN = re.compile(r"[\w .:+\-]*")
_SQL_WORDS = re.compile(
    r"\b(?:union|select|insert|delete|drop|update|exec|execute|shutdown|waitfor|into|order|"
    r"group|having|limit|where|from|procedure|like|rlike|regexp|ilike|between|is|null|xor|"
    r"sounds|declare|truncate|alter|create|notnull|isnull|true|false|in|not)\b|^\s*(?:or|and)\b"
    r"|\d\s*(?:or|and)\b|::|--|\b(?:xp|sp)_\w|" + "|".join(
        re.escape(c) for c in ("information_schema", "sysobjects", "syscolumns", "pg_catalog",
                               "pg_shadow", "sqlite_master", "mysql.user", "all_tables",
                               "user_tables", "sysibm", "nvarchar", "utl_", "openrowset",
                               "opendatasource", "openquery", "dbms_", "pg_sleep")), re.I)


def detect(value: str) -> str:
    """The reason value looks like SQL injection, or ""."""
    if len(value) < 2:
        return ""
    if _PLAIN.fullmatch(value) and not _SQL_WORDS.search(value):
        return ""
    if "/*" in value:
        joined = _INLINE_COMMENT.sub("", value)
        if joined != value:
            # `DR/**/OP`: a comment inside a word only hides a keyword from filters.
            for t in tokenize(joined):
                if t.kind in "UE" or t.kind == "k" and t.text in _CONTINUE:
                    return "comment-split keyword " + t.text
    # Bare context: a numeric parameter continued by SQL, or SQL anywhere.
    toks = tokenize(value)
    if toks:
        why = _anywhere(toks)
        if why:
            return why
        first = toks[0]
        if " ".join(value.lower().split()) in _BARE_OPERATORS:
            return "bare operator"
        if first.kind == "k" and first.text in ("from", "having", "where") and len(toks) > 2:
            j = 2 if first.text == "from" and toks[1].kind == "b" else 1
            nxt = toks[j] if j < len(toks) else None
            if nxt is not None and j == 1 and _operand_then(toks, 1, strict=True):
                return "leading clause"        # `HAVING 1=`, `where id=1`
            if nxt is not None and j == 2 and (
                    nxt.text in ("group", "order") and j + 1 < len(toks)
                    and toks[j + 1].text == "by" or nxt.text == "where"
                    and _operand_then(toks, j + 1, strict=True) or nxt.text == "limit"):
                return "leading clause"        # `FROM t GROUP BY`, `FROM t WHERE x="y"`
        why = _statement_fragment(toks)
        if why:
            return why
        if len(toks) > 1 and _leading_operator(toks):
            return "leading operator"   # `or 88`, `LIKE NULL`, `IN (1, 2)`
        kinds = "".join(t.kind for t in toks if t.kind != "c")
        if kinds in ("nU", "onU") or len(toks) == 2 and kinds == "n" and \
                toks[1].text.startswith(("--", "#")):
            return "numeric comment"    # `-1 #\nunion`, `1--`
        i = 1 if toks[0].kind == "o" and toks[0].text in ("-", "+", "~", "!") else 0
        if i < len(toks) and toks[i].kind in "nv":
            why = _after_break(toks, i + 1, strict=True)
            if why and why != "comment":
                return "numeric " + why
        if toks[0].kind == ")":
            why = _after_break(toks, 0)
            if why in ("boolean", "union", "stacked", "clause"):
                return "paren " + why
        if toks[0].kind == "b" and len(toks) > 2 and toks[1].kind == "&" \
                and _operand_then(toks, 2, strict=True):
            return "word boolean"
        why = _fragment(toks) or _functions(toks)
        if why:
            return why
    for q in ("'", '"'):
        if q not in value:
            continue
        toks = tokenize(value, q)
        if len(toks) < 2:
            continue
        why = _after_break(toks, 1, quote=q)
        if why and _plausible_break(toks, why):
            return "string " + why
        why = _anywhere(toks[1:])
        if why:
            return why
    return ""


def _statement_fragment(toks: list[Token]) -> str:
    """Whole values that are a piece of a statement: `; select`, `execute proc_name`,
    `id having (1 or true)`, `case when ... then ... end`, `order by 1`, `1 * 1/*`."""
    n = len(toks)
    first, second = toks[0], toks[1] if n > 1 else None
    if first.kind == ";" and second is not None and second.kind in "EU":
        return "stacked statement"
    if n == 2 and first.kind == "E" and first.text in ("exec", "execute") and second.kind == "b":
        return "exec procedure"
    if first.kind == "b" and second is not None and second.kind == "k" and \
            second.text in ("having", "where", "limit", "order", "group"):
        if _after_break(toks, 1, strict=True) == "clause":
            return "clause after identifier"
    if first.text == "case":
        words = [t.text for t in toks if t.kind == "k"]
        if "when" in words and "then" in words and "end" in words and \
                words.index("when") < words.index("then") < words.index("end"):
            return "case expression"
    if first.text in ("order", "group") and second is not None and second.text == "by" and (
            n == 2 or n == 3 and toks[2].kind == "n"):
        return "order by"
    last = toks[-1]
    if n >= 3 and first.kind == "n" and last.kind == "c" and last.text.startswith("/*") \
            and not last.text.endswith("*/") and any(t.kind == "o" for t in toks):
        return "expression with open comment"   # the rest of the query commented out
    return ""


def _leading_operator(toks: list[Token]) -> bool:
    """The value starts inside an expression: the application's left operand comes first."""
    first, nxt = toks[0], toks[1]
    if first.kind == "&":
        return nxt.kind in "nsvf(" and _operand_then(toks, 1)
    if first.kind != "o":
        return False
    w = first.text
    if w in ("like", "rlike", "regexp", "glob"):
        return nxt.kind in "nsv" and len(toks) <= 4
    if w in ("in", "not"):
        return nxt.kind == "(" and len(toks) > 2 and toks[2].kind in "nsE"
    if w == "is":
        return nxt.text in ("null", "true", "false") or nxt.text == "not" and len(toks) > 2 \
            and toks[2].text in ("null", "true", "false")
    if w == "between":
        return nxt.kind in "ns" and len(toks) > 3 and toks[2].text == "and"
    return False


def _functions(toks: list[Token]) -> str:
    """A value that is nothing but SQL function calls combined: `LENGTH(version())`,
    `PI() && COS(PI())=-1`."""
    kinds = "".join(t.kind for t in toks)
    if kinds.count("f") < 2 or any(k not in "f(),nso&v" for k in kinds):
        return ""
    if any(t.kind == "f" and t.text in _STRONG_FUNCS for t in toks) or "&" in kinds or any(
            t.kind == "o" and t.text in _COMPARE for t in toks):
        return "function expression"
    return ""


_INLINE_COMMENT = re.compile(r"(?<=[a-z])/\*(?!!).{0,64}?\*/(?=[a-z])", re.S | re.I)


def _fragment(toks: list[Token]) -> str:
    """A parenthesised SQL expression cut off by a trailing comment: what an injection
    into the middle of a WHERE clause looks like (`( 'a' or cos(1) ) --`)."""
    if len(toks) < 4 or toks[-1].kind != "c" or not toks[-1].text.startswith(("--", "#")):
        return ""
    body = toks[:-1]
    kinds = "".join(t.kind for t in body)
    if "(" not in kinds and ")" not in kinds:
        return ""
    if any(c in kinds for c in "&EUfv") or any(t.kind == "o" and t.text in _COMPARE
                                               for t in body):
        return "expression with trailing comment"
    return ""


def _plausible_break(toks: list[Token], why: str) -> bool:
    """A value the application quoted is short: `admin`, `1`, an id. When the text before
    the quote is prose ("DANCIN' LIKE A ROBOT", "14 X 18\" ..."), only strong SQL counts."""
    prefix = toks[0].text
    words = len(prefix.split())
    if why == "comment":
        rest = toks[2:]
        return words <= 1 and len(prefix) <= 32 and (
            not rest or toks[1].text.startswith(("-- ", "#", "/*")) or len(toks[1].text) <= 3)
    if words > 1 or len(prefix) > 40 or "/" in prefix or "?" in prefix:
        return _strong(toks[1:])
    return True


# MongoDB query operators: the NoSQL form of injection, `user[$ne]=x` or {"$where": ...}.
_NOSQL = frozenset(("$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$or", "$and",
                    "$nor", "$not", "$where", "$regex", "$exists", "$expr", "$elemmatch",
                    "$function", "$accumulator", "$lookup", "$eq", "$type", "$all", "$size"))


def nosql_name(name: str) -> str:
    """Why a parameter or JSON key name is a NoSQL operator, or ""."""
    low = name.lower()
    if "$" not in low:
        return ""
    for part in low.replace("]", "[").split("["):
        part = part.strip(" \"'")
        if part in _NOSQL:
            return "nosql operator " + part
    return ""
