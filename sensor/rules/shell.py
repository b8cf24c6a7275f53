"""Shell / remote command injection: a small shell lexer, not a keyword list.

An injected command needs two things: a place where a shell starts a new command (the
start of the value, or after ; | & newline ` $( and friends) and a program name there,
possibly hidden by quoting tricks the shell removes (c''at, c\\at, ca$@t, /bin/c?t). So
the value is normalised the way a shell would read it (empty quotes, backslashes, empty
expansions and ${IFS} removed), split at command separators, and each command's first
word is looked up (after a path prefix like /usr/bin/ is taken off) in a list of programs
an attacker runs. A program at the very start of the value also needs a shell-looking
argument (a flag, a path, a redirection), so that "cat videos" in a search box passes.
Windows cmd.exe syntax (FOR ... IN (...) DO, IF ... ==, %VAR%) has its own shapes.
Everything is linear and bounded by decode.MAX_VALUE.
"""

from __future__ import annotations

import re

# Programs worth flagging wherever a command starts. Common English words (time, who,
# find, sort, more, date, test, set, type, echo) are in AMBIGUOUS: they count only with a
# shell-looking argument or after a separator.
PROGRAMS = frozenset("""
sh bash dash zsh ksh csh tcsh busybox rbash tac nl egrep fgrep rgrep awk gawk mawk nawk
sed perl python python2 python3 ruby php lua node nodejs java javac gcc cc tclsh wish
expect curl wget nc ncat netcat socat telnet ssh scp sftp ftp tftp rsync nmap ping6
traceroute dig nslookup whois openssl base64 xxd od hexdump strings uuencode uudecode
whoami uname hostname ifconfig ip netstat ss route arp lastlog lastb pstree killall
pkill pgrep nohup sudo su chmod chown chgrp chattr lsattr rm rmdir mv cp ln mkdir touch
locate xargs tee dd tar zip unzip gzip gunzip bzip2 xz zcat bzcat 7z rar unrar crontab
systemctl service journalctl dmesg mount umount useradd userdel usermod passwd groupadd
visudo getent printenv export unset alias history strace ltrace gdb ldd objdump readelf
nm chroot setuid capsh timeout wall mail sendmail mailx eval exec source shutdown reboot
halt poweroff init iptables ip6tables nft ufw tcpdump tshark docker kubectl podman runc
ctr crictl ansible ansible-playbook ansible-console ansible-config ansible-inventory
ansible-doc ansible-vault ansible-galaxy chef chef-client chef-run chef-shell chef-solo
chef-vault knife puppet salt salt-call terraform vault consul nomad cscli perf mkfifo
mknod rev fold paste shred wipe script screen tmux setsid aa-disable aa-exec rmt
rmt-dump dump restore php-fpm apt apt-get yum dnf rpm dpkg pip pip3 npm npx gem composer
git svn hg ssh-keygen ssh-copy-id ssh-add vim nvim cmd powershell pwsh cscript wscript
mshta certutil bitsadmin regedit reg regsvr32 rundll32 wmic schtasks tasklist taskkill
net net1 netsh sc bcdboot bcdedit vssadmin icacls takeown cacls diskpart format fsutil
msiexec msbuild installutil forfiles
""".split())
AMBIGUOUS = frozenset("""
ls ll cat grep ping kill last host w id make at watch dir ps top find who time sort
cut join type set test date echo printf read file more less head
tail id w last host dir at make watch kill info man help exit env look split sum
comm diff cmp expand unexpand fmt pr tr uniq wc yes true false sleep cd pwd
""".split())

_SEPARATORS = re.compile(r";|\|\|?|&&?|\n|\r|`|\$\(|<\(|>\(|\{|\(|\)|\}")
_EVASION = re.compile(r"''|\"\"|``|\\(?=[\w/.\-?*])|\$@|\$\(\)|\$\{\}|\$[0-9*]|"
                      r"\$\$|(?<=\w)\$[a-z_]\w*|\$[a-z_]\w*(?=\w)", re.I)
_QUOTED_WORD = re.compile(r"(['\"])([\w][\w.-]*)\1")
_BRACES = re.compile(r"\{([\w./-]+(?:,[\w./-]*)+)\}")   # {nc,-lvp,777}: words, as bash reads it
_IFS = re.compile(r"\$\{?IFS\}?", re.I)
_PREFIX = re.compile(r"^(?:[\w./?*-]*/)?")   # /usr/bin/, bin/, ./, /???/
_VERSION = re.compile(r"(?<=[a-z])[\d.]+$")   # python3.10, gcc7.4 -> python, gcc
_WORD = re.compile(r"[\w.?*\-]+")
_SHELL_ARG = re.compile(
    r"(?:^|\s)(?:-{1,2}\w|/(?:[\w.?*]|\s|$)|~/|\$\w|\$\(|\$\{|\.{1,2}/|[<>]|\d?>&|<<<|\|)")
_GLOB_PATH = re.compile(r"/[\w]*[?*][\w?*]*/|/[\w?*]*[?*][\w?*]*$|/\?\?\?/")
_SENSITIVE = re.compile(
    r"/etc/(?:passwd|shadow|group|hosts|issue|sudoers)|/dev/(?:tcp|udp)/|/bin/(?:ba|z|k|da|)sh\b"
    r"|/proc/self/|\bcmd(?:\.exe)?\s+/[ck]\b|%comspec%|%systemroot%|\bpowershell(?:\.exe)?\s+-"
    r"|\$\{jndi:|\$\{:\d+:-|\$\{?(?:shell|bash|0)\}?\s+-c\b"
    # a program by its bin directory; an editor's shell escape; cd to the root or up
    r"|(?:^|[;|&=`(])\s*/?(?:usr/(?:local/)?)?s?bin/[\w.+-]+"
    r"|\b(?:vi|vim|nvim|ex|ed)\s+-c\s*['\"]?:?\s*\\?!|\bcd\s+(?:/|\.\.|~)(?:\s|;|$)", re.I)
_WIN_FOR = re.compile(r"\bfor\s+(?:/[a-z]\s+(?:\"[^\"]*\"\s+|[^\s%/\"][^\s%]*\s+)?)*%{1,2}[^\s%]{0,16}\s+in"
                      r"\s*\(.*\)\s*do\b",
                      re.I | re.S)
_WIN_IF = re.compile(
    r"\bif(?:\s+|\s*/i\s+)(?:not\s+)?(?:exist\s|defined\s|errorlevel\s|cmdextversion\s|"
    r"\S+\s*(?:==|\s(?:equ|neq|lss|leq|gtr|geq)\s))",
    re.I)
_HERE = re.compile(r"<<<|\d?>\s*/dev/null|2>&1|\b(?:ba|z|k|da)?sh[\s,]+-[ic]\b|\s-exec\s+\S+.*[;+]\s*$"
                   r"|\b(?:whoami|ifconfig|ipconfig|systeminfo)\b|\buname\s+-[a-z]|\bnet\s+(?:user|localgroup)\s",
                   re.I)
# Arguments that make even a common word a command line: a flag, a system directory.
_STRONG_ARG = re.compile(r"(?:^|\s)(?:--?[a-z]{1,16}\b|/(?:etc|bin|usr|var|tmp|dev|proc|home|root|opt|"
                         r"sbin|lib)\b|\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3})", re.I)
# `cmd ...` and $(cmd ...): command substitution, whatever the program's name looks like.
_SUBST = re.compile(r"`\s*([\w./-]{1,64})[^`]{0,256}`|\$\(\s*([\w./-]{1,64})[^)]{0,256}\)")
# A value that opens with a command separator and a word: nothing but a command does that.
# Case-sensitive on purpose: Unix commands are lower case, and ";ON" is punctuation.
_LEADING_SEPARATOR = re.compile(
    r"\s*(?:;|\|\|?|&&?|`|\$\()\s*([a-z][a-z0-9._-]{1,40})(?:\s|$|[;|&`)])")
# A tool name then a GNU long option: `ansible-pull --url x`, `env --version`.
_LONG_OPTION = re.compile(r"\s*([a-z][\w.-]{1,40})\s+--[a-z][\w-]{1,30}\b", re.I)
_TILDE = re.compile(r"^~[+-]?\d*$")
_HISTORY = re.compile(r"(?:^|[\s;|&])!-?\d+\b|(?:^|[\s;|&])!!(?:$|\s)")
_MAIL = re.compile(r"[\r\n]\s*(?:a\d+\s+(?:login|select|fetch|quit|list|uid|logout)\b|quit\b|"
                   r"helo\s|ehlo\s|mail\s+from:|rcpt\s+to:|user\s+\w+\s*[\r\n]|retr\s+\d)",
                   re.I)


_INWORD_QUOTES = re.compile(r"(?<=\w)(['\"])(\w*)\1")
_ENTITY = re.compile(r"&(?:[a-z]{2,8}|#\d{1,6}|#x[0-9a-f]{1,6});", re.I)


def _normalise(value: str) -> str:
    v = _IFS.sub(" ", value)
    if "&" in v:
        v = _ENTITY.sub(" ", v)   # an HTML entity is no `&` separator
    if "'" in v or '"' in v or "\\" in v or "$" in v or "`" in v:
        v = _EVASION.sub("", _EVASION.sub("", v))
        # A quoted part inside a word (c'a't, ca"t") is joined by the shell as well; a
        # lone apostrophe ("I'd") is prose and stays.
        v = _INWORD_QUOTES.sub(r"\2", v)
        v = _QUOTED_WORD.sub(r"\2", v)
    if "{" in v and "," in v:
        v = _BRACES.sub(lambda m: " " + m.group(1).replace(",", " ") + " ", v)
    return v


def _command(segment: str) -> tuple[str, str, bool]:
    """(program name, rest, whether a prefix such as `time` came first) of one command:
    leading noise, `time`/`nohup`/`sudo`/`env`
    prefixes and a path prefix removed."""
    seg = segment.lstrip(" \t!@\"'")
    prefixed = False
    while seg.startswith("$") and " " in seg[:32]:
        seg = seg.split(None, 1)[1] if len(seg.split(None, 1)) > 1 else ""   # unset: empty
        prefixed = True
    for _ in range(3):
        m = _WORD.match(seg)
        if m is None:
            return "", seg, prefixed
        word = m.group(0)
        rest = seg[m.end():]
        name = _VERSION.sub("", _PREFIX.sub("", word).lower())
        if name in ("time", "nohup", "sudo", "env", "exec", "command", "builtin", "xargs",
                    "nice", "timeout", "strace", "busybox") and rest.strip():
            nxt = rest.lstrip()
            if nxt[:1] == "-":
                return name, rest, prefixed   # the prefix's own flag: judge the prefix
            seg = nxt
            prefixed = True
            continue
        return name, rest, prefixed
    return "", seg, prefixed


# Without a separator, path, redirection, variable or Windows syntax character, a value
# can only be a command by its first word (or a few words that never occur in prose):
# one regex and a set lookup instead of the whole lexer, for most ordinary values.
_PLAIN = re.compile(r"[\w .,:@'\"+\-=?#]*")
_PLAIN_WORDS = re.compile(r"\b(?:whoami|ifconfig|ipconfig|systeminfo|uname|net|if|for)\b"
                          r"|\b(?:ba|z|k|da)?sh[\s,]+-[ic]\b", re.I)
_PREFIXES = frozenset(("time", "nohup", "sudo", "env", "exec", "command", "builtin", "xargs",
                       "nice", "timeout", "strace", "busybox"))


def _plain_value(value: str) -> bool:
    if not _PLAIN.fullmatch(value) or _PLAIN_WORDS.search(value):
        return False
    first = value.split(None, 1)
    if not first:
        return True
    word = _VERSION.sub("", first[0].replace("'", "").replace('"', "").lower())
    return word not in PROGRAMS and word not in AMBIGUOUS and word not in _PREFIXES


def detect(value: str) -> str:
    """Why value looks like a command injection, or ""."""
    if len(value) < 2 or _plain_value(value):
        return ""
    m = _SENSITIVE.search(value)
    if m:
        return "shell: " + m.group(0).strip()
    if _TILDE.match(value) or _HISTORY.search(value):
        return "shell expansion"
    if _MAIL.search(value):
        return "mail command injection"
    v = _normalise(value)
    evasion = v != value and bool(_EVASION.search(value))
    if v != value:
        m = _SENSITIVE.search(v)
        if m:
            return "shell (evasion): " + m.group(0).strip()
    for m in _SUBST.finditer(v):
        name = _VERSION.sub("", _PREFIX.sub("", m.group(1) or m.group(2)).lower())
        if name in PROGRAMS or name in AMBIGUOUS:
            return f"command substitution: {name}"
    if _WIN_FOR.search(v) or _WIN_IF.search(v):
        return "cmd.exe FOR/IF"
    if _HERE.search(v):
        return "shell redirection"
    if _GLOB_PATH.search(v) and (v[:1] == "/" or re.search(r"[\s;|&`=]/", v)):
        return "glob path"
    m = _LEADING_SEPARATOR.match(v)
    if m:
        return f"command after a leading separator: {m.group(1)}"
    m = _LONG_OPTION.match(v)
    if m is not None and ("-" in m.group(1) or m.group(1) in PROGRAMS):
        return f"command line: {m.group(1)}"
    parts = _SEPARATORS.split(v)
    for i, seg in enumerate(parts):
        if not seg.strip():
            continue
        name, rest, prefixed = _command(seg)
        if not name:
            continue
        has_path = "/" in seg.split(None, 1)[0] if seg.split() else False
        if i > 0:
            # After a separator: any known program counts, even a bare one.
            if name in PROGRAMS or (name in AMBIGUOUS and _SHELL_ARG.search(rest)):
                return f"command after separator: {name}"
        elif name in PROGRAMS:
            if rest[:1] not in ("", " ", "\t"):
                continue   # "curl/8.5.0": a product token, not a command line
            if has_path or prefixed or evasion or _SHELL_ARG.search(rest) \
                    or _looks_invoked(name, rest):
                return f"command: {name}"
        elif name in AMBIGUOUS and (has_path or prefixed or evasion or _STRONG_ARG.search(rest)
                                    and not seg.lstrip()[:1].isupper()):
            # A common word counts with a flag only as typed in lower case, as a Unix
            # command is: "SET 8 -MINI AS" is a product title.
            return f"command: {name}"
    return ""


# Tools driven by a subcommand word ("pip install x", "knife node list").
_SUBCOMMANDS = frozenset((
    "cscli", "knife", "kubectl", "docker", "podman", "ansible", "certutil", "regedit",
    "bcdboot", "mshta", "wmic", "schtasks", "netsh", "pip", "npm", "npx", "apt", "yum", "dnf",
    "gem", "composer", "git", "systemctl", "service", "chef", "salt", "terraform", "vault",
    "openssl", "sc", "reg", "bitsadmin", "vssadmin", "crontab", "iptables", "nft", "ufw"))


def _looks_invoked(name: str, rest: str) -> bool:
    """A distinctive program with arguments shaped like a command line: a file name with
    an extension, an address, or a subcommand for tools that take one."""
    r = rest.strip()
    if not r:
        return "-" in name   # "ansible-console", "chef-shell": tool names, not words
    if "-" in name or name in _SUBCOMMANDS:
        return True
    return bool(re.match(r"[\w-]+\.\w{1,4}\b|\d+\.\d+\.\d+\.\d+", r))
