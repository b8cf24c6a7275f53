"""TLS plaintext, MySQL: the mariadb CLI with --ssl (OpenSSL) against MariaDB with TLS in
the server namespace, the sensor's meter on the client's veth.

On the wire: the server greeting, the client's SSLRequest (sequence id 1), then TLS. The
plaintext stream starts after the handshake with the client's HandshakeResponse41
(sequence id 2; the greeting went by in clear before it), so the mysql parser picks the
login up there (user, schema) and then every command: the statements come out as mysql
events marked tls_plaintext, with the wire flow's Community ID and uid.

The sensor is the one the TLS plaintext modules share (rig.SharedTlsSensor, started
once); this test reads only the records of flows to its server's port."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.export.collector_proc import query, wait_for
from tests.live.rig import wait_tcp
from tests.live.test_tls_plaintext import _check_joined, _flows
from tests.live.tls_peers import certificate

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(240)]

PORT = 3306
USER, PASSWORD, DB = "loupe", "tls-pw", "loupedb"
STATEMENTS = [
    "CREATE TABLE t (id int, name text)",
    "INSERT INTO t VALUES (1, 'a'), (2, 'b'), (3, 'c')",
    "SELECT id, name FROM t WHERE id <= 2",
    "SELECT * FROM no_such_table",
]
COLS = ("command", "statement", "user", "schema", "error_code", "source", "community_id",
        "uid")


def _mariadb(host):
    """mariadbd with TLS on host's address (inside its namespace); yields when it serves."""
    tmp = Path(tempfile.mkdtemp(prefix="loupe-mytls-"))
    data, sock = tmp / "data", tmp / "mysqld.sock"
    subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
                    "--auth-root-authentication-method=socket", "--skip-test-db"],
                   check=True, capture_output=True, timeout=120)
    key, cert = certificate(tmp)
    proc = host.popen(
        "mariadbd", "--no-defaults", f"--datadir={data}", f"--socket={sock}", f"--port={PORT}",
        f"--bind-address={host.ip4}", "--user=root", f"--pid-file={tmp / 'pid'}",
        "--skip-name-resolve", "--innodb-buffer-pool-size=16M", "--skip-log-bin",
        f"--ssl-key={key}", f"--ssl-cert={cert}", f"--log-error={tmp / 'err.log'}",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    setup = (f"CREATE DATABASE {DB}; CREATE USER '{USER}'@'%' IDENTIFIED BY '{PASSWORD}' "
             f"REQUIRE SSL; GRANT ALL ON {DB}.* TO '{USER}'@'%';")
    # --skip-ssl: the setup is not this test's subject. MariaDB 10.11's client speaks TLS
    # on the Unix socket too, and the server's side of that object is found through
    # /proc by its fd (docs/tls-plaintext.md, "The socket of each TLS object", 3): read
    # late, after the test's TCP connection took the same fd, it was named that flow.
    while subprocess.run(["mariadb", "--no-defaults", "--skip-ssl", f"--socket={sock}",
                          "-uroot", "-e", setup],
                         capture_output=True, timeout=10).returncode != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            shutil.rmtree(tmp, ignore_errors=True)
            raise AssertionError("mariadbd did not start")
        time.sleep(0.2)
    return proc, tmp


def _rows(collector) -> list[dict]:
    rows = query(collector.address,
                 f"SELECT {', '.join(COLS)} FROM mysql WHERE source = 'tls_plaintext' "
                 f"AND community_id IN (SELECT community_id FROM flows "
                 f"WHERE dst_port = {PORT}) ORDER BY ts_ns")
    return [dict(zip(COLS, r)) for r in rows]


def test_mariadb_cli_with_tls(tls_shared, tmp_path):
    if shutil.which("mariadbd") is None or shutil.which("mariadb") is None:
        pytest.skip("MariaDB is not installed (scripts/apt-packages.txt: mariadb-server)")
    pair, collector = tls_shared.pair, tls_shared.collector
    server, tmp = _mariadb(pair.b)
    try:
        wait_tcp(pair.a, pair.b.ip4, PORT)
        out = subprocess.run(
            pair.a.cmd("mariadb", "--no-defaults", "--protocol=TCP", "-h", pair.b.ip4, "-P",
                       str(PORT), f"-u{USER}", f"-p{PASSWORD}", "--ssl", "--force", DB, "-e",
                       "; ".join(["SHOW STATUS LIKE 'Ssl_cipher'", *STATEMENTS])),
            capture_output=True, text=True, timeout=60)
        assert "TLS_" in out.stdout, out.stdout + out.stderr
        assert "no_such_table" in out.stderr
        wait_for(lambda: len([r for r in _rows(collector) if r["command"] == "query"])
                 >= len(STATEMENTS) + 1, 20, "the plaintext mysql events")
        wait_for(lambda: _flows(collector, PORT), 20, "the wire flow")
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    rows = _rows(collector)
    logins = [r for r in rows if r["command"] == "connect"]
    assert [(r["user"], r["schema"]) for r in logins] == [(USER, DB)], rows
    queries = [r for r in rows if r["command"] == "query"]
    assert [r["statement"] for r in queries] == ["SHOW STATUS LIKE 'Ssl_cipher'", *STATEMENTS]
    assert [r["error_code"] for r in queries] == [0, 0, 0, 0, 1146]
    assert {r["source"] for r in rows} == {"tls_plaintext"}
    _check_joined(collector, rows, PORT)
