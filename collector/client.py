"""Analyst-side gRPC plumbing: channels with optional mTLS, and grpc errors translated into
one-line LoupeErrors that name the collector's address."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from sensor.errors import CollectorError, ConfigError, LoupeError, QueryError

# Responses up to the collector's own message limit (a Query result is one message).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# The collector stops any one query after this many seconds (collector/observer.py), and
# `loupe query --timeout` defaults to it: a longer client wait could only end in the
# server's "ran longer than" error. Written here, not in observer.py, so that the CLI
# does not import the server's dependencies to read it.
QUERY_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class ClientTLS:
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    server_name: str | None = None

    @property
    def enabled(self) -> bool:
        return self.ca is not None or self.cert is not None


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}") from None


def open_channel(address: str, tls: ClientTLS | None = None) -> grpc.Channel:
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    if tls is None or not tls.enabled:
        return grpc.insecure_channel(address, options=options)
    if (tls.cert is None) != (tls.key is None):
        raise ConfigError("give both --tls-cert and --tls-key (the client certificate and key)")
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca, "CA certificate"),
        private_key=_read(tls.key, "TLS key"),
        certificate_chain=_read(tls.cert, "TLS certificate"),
    )
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(address, creds, options=options)


def translate(exc: grpc.RpcError, address: str, *, received: int = 0) -> LoupeError:
    """A grpc failure as the one line the CLI prints. `received`: responses a stream had
    already delivered (a collector that answered was reachable; it went away since)."""
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    if code == grpc.StatusCode.UNAVAILABLE and received:
        return CollectorError(
            f"the collector at {address} went away mid-stream after {received} records "
            f"({details.splitlines()[0] if details else 'unavailable'}): was it stopped or "
            "restarted? Run the command again once it is back"
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        return CollectorError(
            f"cannot reach the collector at {address} ({details.splitlines()[0] if details else 'unavailable'}): "
            "is `loupe collector run` running there, and are the TLS flags right?"
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return QueryError(f"the collector at {address} refused the request: {details}")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return CollectorError(f"the collector at {address} refused this certificate: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return CollectorError(f"the collector at {address} did not answer in time")
    name = code.name if code is not None else "error"
    return CollectorError(f"the collector at {address} answered {name}: {details}")
