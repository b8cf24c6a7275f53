"""A real clickhouse-server (Debian's 18.16) for tests: its own config.xml, users.xml and
data directory under a temporary directory, on free loopback ports, stopped after.

Lean start-up: no HTTP, interserver or MySQL ports, small caches, warnings-only logging
to a file; the server answers its native port in about a quarter of a second."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

SERVER = shutil.which("clickhouse-server")
# Not UTC on purpose: what retention deletes must not depend on the server's time zone.
TIMEZONE = "America/Los_Angeles"

CONFIG = """<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>{dir}/server.log</log><errorlog>{dir}/server.err.log</errorlog></logger>
  <tcp_port>{port}</tcp_port>
  <listen_host>127.0.0.1</listen_host>
  <path>{dir}/data/</path>
  <tmp_path>{dir}/data/tmp/</tmp_path>
  <user_files_path>{dir}/data/user_files/</user_files_path>
  <format_schema_path>{dir}/data/format_schemas/</format_schema_path>
  <users_config>{dir}/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <timezone>{tz}</timezone>
  <mark_cache_size>67108864</mark_cache_size>
  <uncompressed_cache_size>67108864</uncompressed_cache_size>
  <mlock_executable>false</mlock_executable>
  {extra}
</yandex>
"""

USERS = """<?xml version="1.0"?>
<yandex>
  <profiles><default/><readonly><readonly>1</readonly></readonly></profiles>
  <users>
    <default><password></password><networks><ip>127.0.0.1</ip></networks>
      <profile>default</profile><quota>default</quota></default>
  </users>
  <quotas><default/></quotas>
</yandex>
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ClickHouseServer:
    def __init__(self, directory: Path, extra: str = "", port: int = 0) -> None:
        if SERVER is None:
            pytest.skip("clickhouse-server is not installed (scripts/apt-packages.txt)")
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        (directory / "config.xml").write_text(
            CONFIG.format(dir=directory, port=self.port, extra=extra, tz=TIMEZONE))
        (directory / "users.xml").write_text(USERS)
        self.proc = subprocess.Popen(
            [SERVER, f"--config-file={directory / 'config.xml'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait()

    def _wait(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"clickhouse-server exited: "
                                   f"{(self.dir / 'server.err.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("clickhouse-server did not open its port in 30 s")

    def stop(self) -> None:
        # The data is thrown away: no need for the server's orderly shutdown (which waits
        # for its background pools, seconds on a busy host).
        self.proc.kill()
        self.proc.wait()


def remote_servers(cluster: str, ports: list[int]) -> str:
    """A <remote_servers> section: one shard per port, one replica each, on loopback."""
    shards = "".join(f"<shard><replica><host>127.0.0.1</host><port>{p}</port></replica></shard>"
                     for p in ports)
    return f"<remote_servers><{cluster}>{shards}</{cluster}></remote_servers>"
