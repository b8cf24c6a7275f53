"""Logging for the daemons and the CLI: one line per event on stderr.

Under systemd, stderr is a stream into journald. journald reads a "<N>" prefix on each
line as the syslog priority (sd-daemon(3)), so `journalctl -p warning` works, and it adds
its own timestamp and unit name, so we print neither. We detect journald the way
systemd.exec(5) says to: $JOURNAL_STREAM names the device and inode of the stream, and
we compare them with stderr's own (a child whose stderr was redirected must not use it).

Each record is exactly one line: newlines inside a message or a traceback are written as
"\\n". A multi-line traceback in the journal becomes many unrelated entries with no
priority, which is worse than one long line. Expected failures (LoupeError) are logged
by their message, without a traceback, by the code that catches them.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Mapping, TextIO

# Python level -> syslog priority (RFC 5424 severity).
SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,   # crit
    logging.ERROR: 3,      # err
    logging.WARNING: 4,    # warning
    logging.INFO: 6,       # info
    logging.DEBUG: 7,      # debug
}


def syslog_priority(levelno: int) -> int:
    """The syslog priority for a Python level, rounding custom levels down to the
    nearest standard one (a level 25 between INFO and WARNING is logged as info)."""
    for level in sorted(SYSLOG_PRIORITY, reverse=True):
        if levelno >= level:
            return SYSLOG_PRIORITY[level]
    return 7


class OneLineFormatter(logging.Formatter):
    """`LEVEL logger: message`, or `<prio>logger: message` for journald; always one line."""

    def __init__(self, *, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        if record.stack_info:
            text = f"{text}\n{self.formatStack(record.stack_info)}"
        text = text.rstrip("\n").replace("\r", "\\r").replace("\n", "\\n")
        if self.journal:
            return f"<{syslog_priority(record.levelno)}>{record.name}: {text}"
        return f"{record.levelname} {record.name}: {text}"


def journal_stream_matches(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True when `stream` is the journald stream systemd connected us to."""
    env = os.environ if environ is None else environ
    device, sep, inode = env.get("JOURNAL_STREAM", "").partition(":")
    if not sep or not device.isdigit() or not inode.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        # Not a real file (a test's StringIO, a closed stream): not journald.
        return False
    return st.st_dev == int(device) and st.st_ino == int(inode)


def setup_logging(*, verbose: bool = False, journal: bool | None = None,
                  stream: TextIO | None = None) -> logging.Handler:
    """Configure the root logger once for the process; replaces earlier handlers.

    journal=None detects journald; True/False forces the prefixed or the plain format.
    Returns the handler (tests read what it wrote)."""
    out = sys.stderr if stream is None else stream
    use_journal = journal_stream_matches(out) if journal is None else journal
    handler = logging.StreamHandler(out)
    handler.setFormatter(OneLineFormatter(journal=use_journal))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    return handler
