"""The plaintext L7 stage without a kernel: chunks as bpf/tls_probe.c sends them (real
HTTP bytes, stream offsets, directions relative to the process) into PlaintextL7, a
recording control in place of the tls_ctl map, and a fixed socket table in place of
/proc. What comes out: the same L7 events as the wire's, marked tls_plaintext, joined by
Community ID and uid; skips as stream offsets; one view per connection; losses counted."""

from __future__ import annotations

import socket

from sensor.engine.plaintext import MAX_NO_SOCKET, PlaintextL7
from sensor.engine.plaintext_socket import Endpoint
from sensor.flow.community_id import DEFAULT as CID
from sensor.kernel.tlsprobe import CTL_DONE, READ, WRITE, Chunk
from sensor.model import L7Event

CLIENT, SERVER = ("198.18.7.1", 40100), ("198.18.7.2", 443)
C_PID, S_PID = 100, 200


def _ip(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET, text)


class Sockets:
    """pid -> Endpoint, as /proc would resolve the fd of each end."""

    def __init__(self) -> None:
        self.by_pid = {
            C_PID: Endpoint(4, _ip(CLIENT[0]), CLIENT[1], _ip(SERVER[0]), SERVER[1], False),
            S_PID: Endpoint(4, _ip(SERVER[0]), SERVER[1], _ip(CLIENT[0]), CLIENT[1], True),
        }

    def resolve(self, pid: int, fd: int):
        return self.by_pid.get(pid) if fd >= 0 else None


class Control:
    def __init__(self) -> None:
        self.writes: list[tuple[int, int, list, list, int]] = []

    def write_ctl(self, tgid, ssl, value) -> bool:
        self.writes.append((tgid, ssl, list(value.grant), list(value.skip_until), value.flags))
        return True


class Process:
    """Chunks of one TLS object, offsets counted per direction as the kernel does."""

    def __init__(self, pid: int, ssl: int = 0x5000, fd: int = 5) -> None:
        self.pid, self.ssl, self.fd = pid, ssl, fd
        self.off = [0, 0]
        self.ts = 1_000_000

    def chunk(self, direction: int, data: bytes, *, length: int | None = None,
              copy: int | None = None) -> Chunk:
        length = len(data) if length is None else length
        off = self.off[direction]
        self.off[direction] += length
        self.ts += 1000
        return Chunk(ts_ns=self.ts, tgid=self.pid, tid=self.pid, ssl=self.ssl, fd=self.fd,
                     fd_src=1, dir=direction, lib="openssl", offset=off, length=length,
                     cgroup_id=1, comm="test", data=data[:copy] if copy is not None else data)


def _stage(**kw):
    records, control = [], Control()
    stage = PlaintextL7(emit=records.append, control=control, resolver=Sockets(), **kw)
    return stage, records, control


REQUEST = b"GET /a?password=hunter2&x=1 HTTP/1.1\r\nHost: h\r\n\r\n"
RESPONSE = b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nnot"


def test_client_transactions_come_out_as_on_the_wire():
    stage, records, _ = _stage(uid_of=lambda key: "Cwireuid")
    p = Process(C_PID)
    for ch in (p.chunk(WRITE, REQUEST), p.chunk(READ, RESPONSE[:20]),
               p.chunk(READ, RESPONSE[20:])):
        stage.on_chunk(ch, 0, 0)
    stage.flush_all()
    [ev] = [r for r in records if isinstance(r, L7Event)]
    assert (ev.detail.method, ev.detail.status, ev.source) == ("GET", 404, "tls_plaintext")
    assert (ev.src_addr, ev.src_port, ev.dst_addr, ev.dst_port) == (*CLIENT, *SERVER)
    assert ev.community_id == CID.compute(src=_ip(CLIENT[0]), dst=_ip(SERVER[0]), protocol=6,
                                          src_port=CLIENT[1], dst_port=SERVER[1])
    assert ev.uid == "Cwireuid"
    assert "hunter2" not in ev.detail.path   # redaction, as on the wire


def test_server_side_directions_and_body_skip_in_offsets():
    stage, records, control = _stage()
    p = Process(S_PID)
    stage.on_chunk(p.chunk(READ, REQUEST), 0, 0)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n"
    # The head and the first 100 body octets in one call; the rest of the call not copied.
    stage.on_chunk(p.chunk(WRITE, head + b"b" * 100, length=len(head) + 16384,
                           copy=len(head) + 100), 0, 0)
    skips = [w[3][WRITE] for w in control.writes if w[3][WRITE]]
    assert skips and skips[-1] == len(head) + 1_000_000   # the body's end, as an offset
    # The kernel skipped the body; a progress mark says the stream got past it.
    stage.on_chunk(Chunk(ts_ns=9, tgid=S_PID, tid=S_PID, ssl=p.ssl, fd=p.fd, fd_src=1,
                         dir=WRITE, lib="openssl", offset=len(head) + 1_000_000, length=0,
                         cgroup_id=1, comm="test", data=b"", flags=4), 0, 0)
    [ev] = [r for r in records if isinstance(r, L7Event)]
    assert (ev.detail.status, ev.detail.response_body_len) == (200, 1_000_000)
    assert (ev.src_addr, ev.dst_port) == (CLIENT[0], SERVER[1])   # the initiator is src


def test_one_view_per_connection():
    """Client and server on one host both see the connection: the first object seen
    feeds the engine, the other is stopped in the kernel."""
    stage, records, control = _stage()
    c, s = Process(C_PID, ssl=0x1), Process(S_PID, ssl=0x2)
    stage.on_chunk(c.chunk(WRITE, REQUEST), 0, 0)
    stage.on_chunk(s.chunk(READ, REQUEST), 0, 0)
    stage.on_chunk(s.chunk(WRITE, RESPONSE), 0, 0)
    stage.on_chunk(c.chunk(READ, RESPONSE), 0, 0)
    stage.flush_all()
    assert len([r for r in records if isinstance(r, L7Event)]) == 1
    assert (S_PID, 0x2, [0, 0], [0, 0], CTL_DONE) in control.writes
    assert stage.stats.duplicate_views == 1


def test_object_without_socket_is_given_up_and_counted():
    stage, records, control = _stage()
    p = Process(999)   # no socket known for it
    for _ in range(MAX_NO_SOCKET):
        stage.on_chunk(p.chunk(WRITE, REQUEST), 0, 0)
    assert stage.stats.no_socket == 1 and stage.stats.no_socket_chunks == MAX_NO_SOCKET
    assert control.writes[-1][4] == CTL_DONE
    assert records == []


def test_reused_object_starts_a_new_connection():
    """An SSL object freed and made again at the same address: offsets start over, and
    the first connection's transactions are not mixed with the second's."""
    stage, records, _ = _stage()
    p = Process(C_PID)
    stage.on_chunk(p.chunk(WRITE, REQUEST), 0, 0)
    stage.on_chunk(p.chunk(READ, RESPONSE), 0, 0)
    p.off = [0, 0]
    stage.on_chunk(p.chunk(WRITE, REQUEST), 0, 0)
    stage.on_chunk(p.chunk(READ, RESPONSE), 0, 0)
    stage.flush_all()
    assert [r.detail.status for r in records if isinstance(r, L7Event)] == [404, 404]
    assert stage.stats.restarted == 1


def test_head_lost_to_the_budget_resynchronises_at_the_next_request():
    stage, records, _ = _stage()
    p = Process(C_PID)
    stage.on_chunk(p.chunk(WRITE, REQUEST), 0, 0)
    # The response head was not copied at all (budget used up): a header-only event.
    stage.on_chunk(p.chunk(READ, b"", length=len(RESPONSE)), 0, 0)
    stage.on_chunk(p.chunk(WRITE, REQUEST), 0, 0)
    stage.on_chunk(p.chunk(READ, RESPONSE), 0, 0)
    stage.flush_all()
    events = [r for r in records if isinstance(r, L7Event)]
    assert events[-1].detail.status == 404
    assert stage.stats.resyncs == 1


def test_port_selection_stops_other_connections_in_the_kernel():
    stage, records, control = _stage(ports=(8443,))
    p = Process(C_PID)
    stage.on_chunk(p.chunk(WRITE, REQUEST), 0, 0)
    stage.on_chunk(p.chunk(READ, RESPONSE), 0, 0)
    stage.flush_all()
    assert records == [] and stage.stats.not_selected == 1
    assert control.writes == [(C_PID, p.ssl, [0, 0], [0, 0], CTL_DONE)]


def test_object_with_few_chunks_and_no_socket_is_counted_at_the_end():
    stage, records, _ = _stage()
    p = Process(999)
    stage.on_chunk(p.chunk(WRITE, REQUEST), 0, 0)
    stage.on_chunk(p.chunk(READ, RESPONSE), 0, 0)
    assert stage.stats.no_socket == 0
    stage.flush_all()
    assert stage.stats.no_socket == 1 and records == []


def test_chunk_before_its_socket_is_held_and_fed_first():
    """A Go Conn's first Write is sent at its entry, before its syscall shows the fd
    (bpf/tls_probe.c): the chunk comes without one, then the Write's RET mark or the
    response's Read brings the fd. The request is fed first, as the kernel ordered it."""
    for mark_first in (True, False):
        stage, records, _ = _stage()
        p = Process(C_PID)
        p.fd = -1
        stage.on_chunk(p.chunk(WRITE, REQUEST), 0, 0)   # no fd: held, not lost
        p.fd = 5
        if mark_first:
            stage.on_chunk(Chunk(ts_ns=9, tgid=C_PID, tid=C_PID, ssl=p.ssl, fd=5, fd_src=2,
                                 dir=WRITE, lib="go", offset=len(REQUEST), length=0,
                                 cgroup_id=1, comm="test", data=b"", flags=4), 0, 0)
        stage.on_chunk(p.chunk(READ, RESPONSE), 0, 0)
        stage.flush_all()
        [ev] = [r for r in records if isinstance(r, L7Event)]
        assert (ev.detail.method, ev.detail.status) == ("GET", 404)
        assert (stage.stats.no_socket, stage.stats.held_dropped, stage.stats.restarted) == (0, 0, 0)


def test_held_chunks_of_an_object_given_up_are_counted():
    stage, _, _ = _stage()
    p = Process(999)
    for _ in range(MAX_NO_SOCKET):
        stage.on_chunk(p.chunk(WRITE, REQUEST), 0, 0)
    assert stage.stats.held_dropped == MAX_NO_SOCKET and not stage._held


def test_destroy_aborts_a_local_socket():
    """How a blocked plaintext flow is reset (plaintext_socket.destroy, sock_diag
    SOCK_DESTROY): the owner's next call fails, its peer gets a RST."""
    import os

    import pytest

    from sensor.engine.plaintext_socket import destroy

    if os.geteuid() != 0:
        pytest.skip("SOCK_DESTROY needs CAP_NET_ADMIN")
    with socket.create_server(("127.0.0.1", 0)) as srv:
        client = socket.create_connection(srv.getsockname())
        server, _ = srv.accept()
        with client, server:
            (la, lp), (ra, rp) = client.getsockname(), client.getpeername()
            ep = Endpoint(4, _ip(la), lp, _ip(ra), rp, False)
            assert destroy(os.getpid(), ep) == ""
            try:
                client.send(b"x")
            except OSError as exc:
                assert exc.errno == 103   # ECONNABORTED
            else:
                raise AssertionError("the socket was not aborted")
            server.settimeout(5)
            try:
                server.recv(1)
            except OSError as exc:
                assert exc.errno == 104   # ECONNRESET: the kernel's RST
            else:
                raise AssertionError("the peer was not reset")
            assert destroy(os.getpid(), ep) != ""   # gone: one line why, no exception
