"""The copy budget for length-framed protocols on the real kernel, with real servers.

A live sensor on the host's loopback (the servers listen on 127.0.0.1, each on a port
of its own that the sensor selects) sees two connections per protocol with the same
number of requests, small and large answers. Every request is parsed either way, and
the bytes the kernel copied to userspace (each flow's own l7_coverage) stay nearly the
same while the answers differ by four orders of magnitude:

- MariaDB: 20 SELECTs of 10 rows against 20 of 100,000 rows. After ROW_WALK_LIMIT rows
  the MySQL parser needs nothing more of the response (idle_until_request); the kernel
  holds the server direction (LOUPE_CTL_HOLD) until the client's next command, and the
  rows left out arrive as one Skip. The large result is reported with the rows counted
  before the hold and rows_truncated ("at least N").
- Redis: 20 GETs of a 10-byte value against 20 of a 10 MiB value. The bulk string's
  length comes first, so the parser's skip hint becomes a kernel skip-until-seq. While the
  clients run, the sensor is stopped (SIGSTOP) for STALL_S every STALL_EVERY_S: userspace
  lags behind the kernel as on a loaded machine, so many skips land while their body is
  in flight and some only after its last packet went by, its closing CRLF truncated (the
  case that once ended the parse, tests/kernel/test_redis_lag.py). Every GET must still
  be parsed and the copy must stay as small.

One sensor selecting both servers' ports serves the two tests (a sensor start is mostly
bcc compiling, and it compiles while MariaDB is made). Each test reads only the flows to
its own server's port, once they have ended and been printed; the sensor's clean exit is
checked when the module is done.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import pytest

from sensor.model import Flow, L7Event
from sensor.l7.mysql import ROW_WALK_LIMIT
from tests.fixtures import gen_mysql, gen_redis
from tests.export.collector_proc import free_port
from tests.live.rig import Sensor, wait_closed

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(240)]

REQUESTS = 20
# The Redis test's stalls of the sensor: long enough for a 10 MiB reply on loopback to
# go by (a few ms), short and rare enough that the test takes seconds more, not minutes.
STALL_S = 0.03
STALL_EVERY_S = 0.08


VALUES = {"small": b"v" * 10, "large": b"V" * (10 << 20)}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """{"mysql": port (when MariaDB can run here), "redis": RedisServer, "sensor": Sensor}:
    the servers, the Redis values set before the sensor starts (that SET is not a flow it
    sees), and one `loupe sensor run` on lo selecting both ports. Stopped after the
    module's last test, which then checks the exit code."""
    tmp = tmp_path_factory.mktemp("dbbudget")
    with contextlib.ExitStack() as stack:
        env = {"redis": stack.enter_context(gen_redis.RedisServer())}
        server = env["redis"]
        client = server.client()
        for name, value in VALUES.items():
            client.set(f"budget:{name}", value)
        client.close()
        wait_closed(server.port)
        ports = [server.port]
        if gen_mysql.available() is None:
            ports.append(free_port())
        env["sensor"] = sensor = Sensor(
            ["--iface", "lo", "--collector", "", "--spool-dir", str(tmp / "spool"),
             "--sensor-id", "livedbbudget", "--output", "jsonl", "--interval", "0.5",
             "--select", ",".join(f"port:{p}" for p in ports), "--no-process",
             "--set", "timeouts.tcp_linger=1s"], workdir=tmp)
        stack.callback(sensor.kill)
        # It compiles while MariaDB is made (set up over its unix socket: no TCP flow).
        sensor.launch()
        if len(ports) == 2:
            env["mysql"], _ = stack.enter_context(gen_mysql.mariadb(ports[1]))
        sensor.wait_note("READY=1", 90)
        yield env
        assert sensor.stop() == 0, sensor.stderr
        assert "Traceback" not in sensor.stderr, sensor.stderr


def _ended(port: int, kind: str, keys) -> "callable":
    """records -> True once, for each key, one flow to `port` has an event matching it
    and that flow's record is out (the flow ended: its events were printed before it)."""
    def done(records) -> bool:
        flows, events = _by_flow(records, port, kind)
        for key in keys:
            uids = [u for u, e in events.items() if any(key(x) for x in e)]
            if len(uids) != 1 or uids[0] not in flows:
                return False
        return True
    return done


def _by_flow(records, port: int, kind: str) -> tuple[dict, dict]:
    """(uid -> Flow, uid -> [events of kind]) for the flows to `port`."""
    flows = {r.uid: r for r in records if isinstance(r, Flow) and r.dst_port == port}
    events: dict[str, list] = {}
    for r in records:
        if isinstance(r, L7Event) and r.kind == kind and r.dst_port == port:
            events.setdefault(r.uid, []).append(r.detail)
    return flows, events


def _server_copied(flow: Flow) -> int:
    return flow.l7_coverage.captured_octets


@pytest.mark.skipif(gen_mysql.available() is not None, reason=str(gen_mysql.available()))
def test_mariadb_100000_rows_copy_about_what_10_rows_do(shared):
    import pymysql

    statements = {"small": "SELECT seq FROM seq_1_to_10",
                  "large": "SELECT seq FROM seq_1_to_100000"}
    port, sensor = shared["mysql"], shared["sensor"]
    for sql in statements.values():
        conn = pymysql.connect(host="127.0.0.1", port=port, user=gen_mysql.USER,
                               password=gen_mysql.PASSWORD, database=gen_mysql.DB,
                               ssl_disabled=True, autocommit=True)
        with conn.cursor() as cur:
            for _ in range(REQUESTS):
                cur.execute(sql)
                assert len(cur.fetchall()) == int(sql.rsplit("_", 1)[1])
        conn.close()
    # Past the 1 s linger and a read: both connections' flows are printed.
    records = sensor.wait_records(
        _ended(port, "mysql", [lambda e, q=sql: e.statement == q for q in statements.values()]),
        30, "ended MariaDB flows")
    flows, events = _by_flow(records, port, "mysql")
    copied = {}
    for name, sql in statements.items():
        [(uid, got)] = [(u, e) for u, e in events.items()
                        if any(x.statement == sql for x in e)]
        queries = [e for e in got if e.statement == sql]
        # Every SELECT parsed, answered with a result set.
        assert len(queries) == REQUESTS and all(e.status == "result" for e in queries)
        if name == "small":
            assert all((e.rows, e.rows_truncated) == (10, False) for e in queries)
        else:
            # At least the rows before the hold; exact when the kernel had copied them all.
            assert all(e.rows == 100_000 or (e.rows_truncated and e.rows >= ROW_WALK_LIMIT)
                       for e in queries), [(e.rows, e.rows_truncated) for e in queries]
        copied[name] = _server_copied(flows[uid])
    print(f"payload copied: 20 x 10 rows {copied['small']} B, 20 x 100,000 rows "
          f"{copied['large']} B (about {REQUESTS * 100_000 * 11} B of rows on the wire)")
    # 100,000 rows a query would be ~22 MB in all; the hold keeps each response to the
    # rows the parser walks plus what was in flight before the hold reached the kernel.
    assert copied["large"] <= 8 * copied["small"] + REQUESTS * 16384, copied


class _Stalls:
    """Stops a process for STALL_S every STALL_EVERY_S, from a thread, until the block
    ends (and leaves it running)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.done.wait(STALL_EVERY_S - STALL_S):
            os.kill(self.pid, signal.SIGSTOP)
            try:
                time.sleep(STALL_S)
            finally:
                os.kill(self.pid, signal.SIGCONT)

    def __enter__(self) -> "_Stalls":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


def test_redis_10_mib_values_copy_about_what_10_byte_values_do(shared):
    values = VALUES
    server, sensor = shared["redis"], shared["sensor"]
    with _Stalls(sensor.proc.pid):
        for name, value in values.items():
            c = server.client()     # one connection each
            for _ in range(REQUESTS):
                assert c.get(f"budget:{name}") == value
            c.close()
    records = sensor.wait_records(
        _ended(server.port, "redis", [lambda e, k=f"budget:{n}": e.key == k for n in values]),
        30, "ended Redis flows")
    flows, events = _by_flow(records, server.port, "redis")
    copied = {}
    for name in values:
        [(uid, got)] = [(u, e) for u, e in events.items()
                        if any(x.key == f"budget:{name}" for x in e)]
        gets = [e for e in got if e.command == "GET" and e.key == f"budget:{name}"]
        assert [(e.reply_type, e.reply_len) for e in gets] == \
            [("bulk", len(values[name]))] * REQUESTS, (name, gets[-2:])
        copied[name] = _server_copied(flows[uid])
    print(f"payload copied: 20 GETs of 10 B {copied['small']} B, of 10 MiB "
          f"{copied['large']} B ({REQUESTS * 10} MiB on the wire)")
    assert copied["large"] <= 4 * copied["small"] + REQUESTS * 4096, copied
