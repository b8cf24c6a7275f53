"""The copy budget for PostgreSQL on the real kernel, with a real server and psycopg.

PostgreSQL 15 runs in a test namespace; the sensor watches the server's veth, where the
server's segments leave in order (on lo's ingress, per-CPU backlogs reorder segments, and
a walk of small frames stops at the first reordered one: bpf/frames.h). It sees two
connections from the other namespace, of 20 SELECTs each (psycopg prepares the statement
after five runs, so most are Executes):
10 rows, then 100,000 rows. The kernel follows the server's messages (bpf/frames.h) and
leaves the DataRow messages out by itself, so every query is still parsed with its exact
row count (from the CommandComplete tag; `data_rows` counts the rows that reached the
parser, a lower bound) and the octets copied to userspace (each flow's own l7_coverage)
stay nearly the same although the results differ 10,000-fold.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sensor.model import Flow, L7Event, LostEvent
from tests.conftest import REPO
from tests.fixtures import gen_pgsql
from tests.live.rig import Sensor, wait_tcp
from tests.netns import VethPair

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(240),
              pytest.mark.skipif(not gen_pgsql.BIN.exists(), reason="PostgreSQL 15 not installed")]

QUERIES = 20
ROWS = {"small": 10, "large": 100_000}


PORT = 5432
# The client, run in the other namespace: QUERIES SELECTs of n rows on one connection.
CLIENT = """
import json, sys, psycopg
dsn, n, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with psycopg.connect(dsn, autocommit=True) as conn:
    got = [len(conn.execute("SELECT g, 'row ' || g FROM generate_series(1, %d) g" % n)
               .fetchall()) for _ in range(count)]
print(json.dumps(got))
"""


class NsPgServer:
    """initdb + pg_ctl (as gen_pgsql.PgServer) listening on `host`'s address inside its
    namespace, password logins from the test namespaces, no TLS."""

    def __init__(self, host) -> None:
        self.host = host
        # Not under pytest's tmp_path: its parents are root's alone, and the server
        # refuses to run as root.
        self.dir = Path(tempfile.mkdtemp(prefix="loupe-pgbudget-"))
        self.data = self.dir / "data"

    def _as_postgres(self, *cmd: str) -> None:
        subprocess.run(self.host.cmd("runuser", "-u", "postgres", "--", *cmd), check=True,
                       capture_output=True, text=True, timeout=60)

    def __enter__(self) -> "NsPgServer":
        shutil.chown(self.dir, "postgres", "postgres")
        self._as_postgres(str(gen_pgsql.BIN / "initdb"), "-D", str(self.data), "-U",
                          "postgres", "--auth-host=scram-sha-256", "--auth-local=trust",
                          "-E", "UTF8", "--locale=C.UTF-8")
        with open(self.data / "pg_hba.conf", "a") as hba:
            hba.write("host all all 198.18.0.0/15 scram-sha-256\n")
        opts = (f"-c listen_addresses={self.host.ip4} -p {PORT} -c unix_socket_directories="
                f"{self.dir} -c fsync=off -c ssl=off")
        self._as_postgres(str(gen_pgsql.BIN / "pg_ctl"), "-D", str(self.data), "-o", opts,
                          "-l", str(self.dir / "log"), "-w", "-t", "30", "start")
        for stmt in (f"CREATE ROLE {gen_pgsql.USER} LOGIN PASSWORD '{gen_pgsql.PASSWORD}'",
                     f"CREATE DATABASE {gen_pgsql.DB} OWNER {gen_pgsql.USER}"):
            self._as_postgres(str(gen_pgsql.BIN / "psql"), "-X", "-q", "-h", str(self.dir),
                              "-p", str(PORT), "-U", "postgres", "-d", "postgres", "-c", stmt)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._as_postgres(str(gen_pgsql.BIN / "pg_ctl"), "-D", str(self.data), "-m",
                              "immediate", "-w", "-t", "30", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def _queried_flows_ended(records) -> bool:
    """Both client connections' flows (those with pgsql events) are printed."""
    queried = {r.uid for r in records if isinstance(r, L7Event) and r.kind == "pgsql"}
    return sum(isinstance(r, Flow) and r.uid in queried for r in records) >= len(ROWS)


def test_pgsql_100000_rows_copy_about_what_10_rows_do(tmp_path):
    with VethPair.create("pgb") as pair:
        pair.wait_ready()
        dsn = (f"host={pair.b.ip4} port={PORT} user={gen_pgsql.USER} "
               f"password={gen_pgsql.PASSWORD} dbname={gen_pgsql.DB} sslmode=disable "
               f"gssencmode=disable")
        sensor = Sensor(["--netns", pair.b.netns, "--iface", pair.b.iface, "--collector", "",
                         "--spool-dir", str(tmp_path / "spool"), "--sensor-id", "livepgbudget",
                         "--output", "jsonl", "--interval", "0.5", "--select", f"port:{PORT}",
                         "--no-process", "--set", "timeouts.tcp_linger=1s"], workdir=tmp_path)
        try:
            # The sensor compiles while the server is made (initdb, start: over its unix
            # socket, no TCP). The readiness probe then comes after the attach: a flow
            # without pgsql events, which the checks below leave out.
            sensor.launch()
            with NsPgServer(pair.b):
                sensor.wait_note("READY=1", 90)
                wait_tcp(pair.a, pair.b.ip4, PORT)
                for n in ROWS.values():    # one connection each
                    out = pair.a.run("env", f"PYTHONPATH={REPO}", sys.executable, "-c",
                                     CLIENT, dsn, str(n), str(QUERIES), timeout=120).stdout
                    assert json.loads(out) == [n] * QUERIES
                # Past the linger and a read: both connections' flows are printed.
                sensor.wait_records(_queried_flows_ended, 30, "the two flows")
                assert sensor.stop() == 0
        finally:
            sensor.kill()
    port = PORT
    records = sensor.records()
    lost = [r for r in records if isinstance(r, LostEvent)]
    flows = {r.uid: r for r in records if isinstance(r, Flow) and r.dst_port == port}
    events: dict[str, list] = {}
    for r in records:
        if isinstance(r, L7Event) and r.kind == "pgsql" and r.dst_port == port:
            events.setdefault(r.uid, []).append(r.detail)
    uids = sorted(events, key=lambda u: flows[u].flow_start_ns)
    assert len(uids) == 2, {u: len(e) for u, e in events.items()}
    copied, wire = {}, {}
    for (name, n), uid in zip(ROWS.items(), uids):
        cov = flows[uid].l7_coverage
        # psycopg prepares a statement run five times: the rest are Executes.
        queries = [e for e in events[uid] if e.kind in ("query", "execute")]
        # Every SELECT parsed, with its exact row count; the rows that reached the parser
        # are a lower bound of it.
        assert [(e.command_tag, e.rows) for e in queries] == \
            [(f"SELECT {n}", n)] * QUERIES, (name, cov, lost)
        assert all(e.data_rows <= e.rows for e in queries)
        copied[name] = cov.captured_octets
        wire[name] = (cov.captured_octets + cov.skipped_octets + cov.truncated_octets
                      + cov.gap_octets)
        assert cov.gap_octets == 0, cov
    print(f"payload copied: {QUERIES} SELECTs of 10 rows {copied['small']} B "
          f"(of {wire['small']} B), of 100,000 rows {copied['large']} B (of {wire['large']} B)")
    assert wire["large"] > QUERIES * ROWS["large"] * 10
    assert copied["large"] <= 2 * copied["small"] + 16384, copied
