"""The live sensor with [pii] on (LiveL7 fed the payload events the kernel would send, its
l7_ctl writes recorded): the budget grants the request body prefix and the response
sample PII counting wants, neither is skipped, and the counts reach the record."""

from __future__ import annotations

import json

from sensor.engine.live import LiveL7
from sensor.l7.pii import Scanner
from sensor.model import L7Event
from tests.live.test_live_l7 import ACK, FIN, SYN, Conn, Control, _key, _run


def test_live_budget_grants_what_pii_counting_reads():
    records, ctl = [], Control()
    l7 = LiveL7(emit=records.append, control=ctl, budget=(1024, 1024), refill_octets=1024,
                pii=Scanner(body_bytes=6000, response_bytes=3000))
    c = Conn(_key())
    body = json.dumps({"note": "y" * 3000, "card": "4111111111111111"}).encode()
    head = (b"POST /api/notes HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    _run(l7, [c.event(0, b"", SYN), c.event(1, b"", SYN | ACK), c.event(0, head)])
    granted = sum(call[2] for call in ctl.calls if call[0] == "grant" and call[1] == 0)
    assert 1024 + granted >= len(head) + len(body)
    assert not [call for call in ctl.calls if call[0] == "skip"]
    _run(l7, [c.event(0, body[i:i + 1448]) for i in range(0, len(body), 1448)])
    rbody = json.dumps({"pad": "z" * 2000, "owner": "alice.planted@example.com"}).encode()
    rhead = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d"
             b"\r\n\r\n" % len(rbody))
    _run(l7, [c.event(1, rhead)])
    granted = sum(call[2] for call in ctl.calls if call[0] == "grant" and call[1] == 1)
    assert 1024 + granted >= len(rhead) + len(rbody)
    assert not [call for call in ctl.calls if call[0] == "skip"]
    _run(l7, [c.event(1, rbody[i:i + 1448]) for i in range(0, len(rbody), 1448)])
    _run(l7, [c.event(0, b"", FIN | ACK), c.event(1, b"", FIN | ACK)])
    [http] = [r for r in records if isinstance(r, L7Event)]
    assert dict(http.detail.pii) == {"card.request": 1, "email.response": 1}
