"""TLS plaintext, PostgreSQL: psql with sslmode=require (libpq -> OpenSSL) against a
PostgreSQL 15 with ssl=on in the server namespace, the sensor's meter on the client's veth.

On the wire the connection is an SSLRequest, 'S', then TLS: the wire's pgsql parser hands
the stream to the TLS parser. The plaintext stream starts after the handshake, with the
StartupMessage, so the same pgsql parser sees a session as if TLS were off: the startup
(user, database) and each statement's text come out as pgsql events marked
tls_plaintext, with the wire flow's Community ID and uid.

The sensor is the one the TLS plaintext modules share (rig.SharedTlsSensor, started
once); this test reads only the records of flows to its server's port."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.export.collector_proc import query, wait_for
from tests.live.rig import wait_tcp
from tests.live.test_tls_plaintext import _check_joined, _flows
from tests.live.tls_peers import certificate

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(240)]

BIN = Path("/usr/lib/postgresql/15/bin")
PORT = 5432
USER, PASSWORD, DB = "loupe", "tls-pw", "loupedb"
STATEMENTS = [
    "CREATE TABLE t (id int, name text);",
    "INSERT INTO t SELECT g, 'n' || g FROM generate_series(1, 5) g;",
    "SELECT id, name FROM t WHERE id <= 3;",
    "SELECT * FROM no_such_table;",
]
COLS = ("kind", "statement", "user", "database", "sqlstate", "source", "community_id",
        "uid")


class TlsPgServer:
    """initdb + pg_ctl (as tests/fixtures/gen_pgsql.py's PgServer) with ssl=on and a
    self-signed certificate, listening on `host`'s address inside its namespace."""

    def __init__(self, host) -> None:
        self.host = host
        # Not under pytest's tmp_path: its parents are root's alone, and the server
        # refuses to run as root.
        self.dir = Path(tempfile.mkdtemp(prefix="loupe-pgtls-"))
        self.data = self.dir / "data"

    def _as_postgres(self, *cmd: str) -> None:
        subprocess.run(self.host.cmd("runuser", "-u", "postgres", "--", *cmd), check=True,
                       capture_output=True, text=True, timeout=60)

    def __enter__(self) -> "TlsPgServer":
        key, cert = certificate(self.dir)
        os.chmod(key, 0o600)
        for p in (self.dir, key, cert):
            shutil.chown(p, "postgres", "postgres")
        self._as_postgres(str(BIN / "initdb"), "-D", str(self.data), "-U", "postgres",
                          "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8",
                          "--locale=C.UTF-8")
        # TLS only, from the test namespaces (initdb allows loopback alone).
        with open(self.data / "pg_hba.conf", "a") as hba:
            hba.write("hostssl all all 198.18.0.0/15 scram-sha-256\n")
        opts = (f"-c listen_addresses={self.host.ip4} -p {PORT} -c unix_socket_directories="
                f"{self.dir} -c fsync=off -c ssl=on -c ssl_cert_file={cert} "
                f"-c ssl_key_file={key}")
        self._as_postgres(str(BIN / "pg_ctl"), "-D", str(self.data), "-o", opts,
                          "-l", str(self.dir / "log"), "-w", "-t", "30", "start")
        for stmt in (f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'",
                     f"CREATE DATABASE {DB} OWNER {USER}"):
            self._as_postgres(str(BIN / "psql"), "-X", "-q", "-h", str(self.dir), "-p",
                              str(PORT), "-U", "postgres", "-d", "postgres", "-c", stmt)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._as_postgres(str(BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                              "-w", "-t", "30", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def _rows(collector) -> list[dict]:
    rows = query(collector.address,
                 f"SELECT {', '.join(COLS)} FROM pgsql WHERE source = 'tls_plaintext' "
                 f"AND community_id IN (SELECT community_id FROM flows "
                 f"WHERE dst_port = {PORT}) ORDER BY ts_ns")
    return [dict(zip(COLS, r)) for r in rows]


def test_psql_sslmode_require(tls_shared, tmp_path):
    if not (BIN / "initdb").exists():
        pytest.skip("PostgreSQL 15 is not installed (scripts/apt-packages.txt: postgresql-15)")
    pair, collector = tls_shared.pair, tls_shared.collector
    with TlsPgServer(pair.b):
        wait_tcp(pair.a, pair.b.ip4, PORT)
        env = dict(os.environ, PGPASSWORD=PASSWORD, PGSSLMODE="require",
                   PGGSSENCMODE="disable")
        out = subprocess.run(
            pair.a.cmd(str(BIN / "psql"), "-X", "-h", pair.b.ip4, "-p", str(PORT),
                       "-U", USER, "-d", DB, "-P", "pager=off", "-v", "ON_ERROR_STOP=0",
                       "-c", "SHOW ssl", *[a for s in STATEMENTS for a in ("-c", s)]),
            env=env, capture_output=True, text=True, timeout=60)
        assert out.stdout.split("\n")[2:3] == [" on"], out.stdout + out.stderr
        assert "no_such_table" in out.stderr
        wait_for(lambda: len([r for r in _rows(collector) if r["kind"] != "startup"])
                 >= len(STATEMENTS) + 1, 20, "the plaintext pgsql events")
        wait_for(lambda: _flows(collector, PORT), 20, "the wire flow")
    rows = _rows(collector)
    startup = [r for r in rows if r["kind"] == "startup"]
    assert [(r["user"], r["database"]) for r in startup] == [(USER, DB)], rows
    queries = [r for r in rows if r["kind"] != "startup"]
    assert [r["statement"] for r in queries] == ["SHOW ssl", *STATEMENTS]
    assert [r["sqlstate"] for r in queries] == ["", "", "", "", "42P01"]
    assert {r["source"] for r in rows} == {"tls_plaintext"}
    _check_joined(collector, rows, PORT)
