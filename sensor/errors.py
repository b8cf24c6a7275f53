"""Loupe's error tree.

Two families, kept apart on purpose:
- LoupeError: something a user can hit and fix (no privileges, no such interface, port in
  use, unreadable pcap). The CLI prints its message, one line, and exits non-zero: no
  traceback. Every message says what went wrong and what to do.
- Anything else escaping to the CLI is a bug, and keeps its traceback.

"The peer sent garbage" is not an exception at all past the parser that saw it: parsers
count it and move on (see sensor/l7/base.py).

Third-party exceptions (bcc, grpc, dpkt, duckdb) are translated into these at the module
that calls the library.
"""

from __future__ import annotations


class LoupeError(Exception):
    """An expected failure with a message for the user. exit_code is the CLI's exit status."""

    exit_code = 1


class ConfigError(LoupeError):
    """A bad configuration key, value or command-line flag."""

    exit_code = 2


class PrivilegeError(LoupeError):
    """Not root, or missing CAP_BPF / CAP_NET_ADMIN / CAP_PERFMON."""


class KernelError(LoupeError):
    """The kernel cannot run our programs: headers missing, kernel too old, attach refused."""


class InterfaceError(LoupeError):
    """No such network interface, or it went away."""


class CaptureFileError(LoupeError):
    """A pcap/pcapng file that cannot be opened or is not a capture at all."""


class CollectorError(LoupeError):
    """The collector cannot start (port in use, storage locked) or cannot be reached."""


class StorageError(LoupeError):
    """The store cannot be opened or written."""


class MetricsError(LoupeError):
    """The metrics endpoint cannot be served (address in use, not permitted)."""


class QueryError(LoupeError):
    """A query that was refused (not read-only) or failed."""


class SchemaError(LoupeError):
    """A record or batch that fails validation. The collector rejects it; nothing else
    in the batch's stream is affected."""
