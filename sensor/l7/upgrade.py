"""The TLS that follows a cleartext upgrade, for the parser that saw the upgrade.

STARTTLS (SMTP, IMAP, POP3, FTP: sensor/l7/starttls.py), PostgreSQL's SSLRequest answered
'S' and MySQL's SSLRequest turn a cleartext stream into TLS. The parser that saw the
upgrade keeps the flow and hands every later byte to a TlsParser (sensor/l7/tls.py), so
the TLS is parsed like any TLS: its TlsEvents (kind "tls": the engine names an event's
kind from its detail class) are the flow's next transactions, and the TLS parser's end
(DONE after the handshake, ERROR on garbage) ends the outer parser.
"""

from __future__ import annotations

from sensor.l7.base import NEED_DATA, Direction, ParserState, Transaction, _NeedData
from sensor.l7.tls import TlsParser

# Client bytes held between an upgrade request and the server's answer (sent early, or fed
# first when one direction is read before the other): one ClientHello record (16 KiB +
# header) with room for a second one a huge hello spills into.
MAX_HELD = 40 * 1024


class Handover:
    """One upgraded flow's TLS. `what` names the upgrade in an error ("STARTTLS")."""

    __slots__ = ("tls", "what")

    def __init__(self, what: str) -> None:
        self.tls = TlsParser()
        self.what = what

    def data(self, owner, direction: Direction, data: bytes, ts_ns: int) -> None:
        if data:
            self.tls.receive_data(direction, data, ts_ns)
            self.settle(owner)

    def gap(self, owner, direction: Direction, length: int, ts_ns: int) -> None:
        self.tls.receive_gap(direction, length, ts_ns)
        self.settle(owner)

    def eof(self, owner, direction: Direction, ts_ns: int) -> None:
        self.tls.receive_eof(direction, ts_ns)
        self.settle(owner)

    def settle(self, owner) -> None:
        """The owner ends when its TLS does: DONE after the handshake, ERROR on garbage."""
        state = self.tls.state
        if state is ParserState.DONE:
            owner.state = ParserState.DONE
        elif state is ParserState.ERROR:
            owner.state = ParserState.ERROR
            owner.error = f"TLS after {self.what}: {self.tls.error}"

    def next_event(self) -> Transaction | _NeedData:
        return self.tls.next_event()

    def summary(self) -> dict[str, str]:
        return self.tls.summary()


__all__ = ["Handover", "MAX_HELD", "NEED_DATA"]
