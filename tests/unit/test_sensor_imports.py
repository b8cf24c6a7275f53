"""`loupe sensor run` imports nothing it does not use: no pyarrow (the table sinks), pandas
or DuckDB (the collector), and no bcc (programs are compiled in a child process). Each
would cost an idle sensor tens of MiB (docs/sensor.md, "Idle cost")."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

# What `sensor run` imports on its way to the main loop: the command modules, the config,
# every exporter (gRPC with its spool, JSON lines to a file and to stdout), the live
# pipeline, its loader, process attribution and the metrics registry.
_RUN_PATH = r"""
import json, sys
from sensor import cli
args = cli.build_parser(cli.modules_for(["sensor", "run"])).parse_args(
    ["sensor", "run", "--iface", "lo", "--collector", "127.0.0.1:9",
     "--spool-dir", sys.argv[1] + "/spool", "--set", "export.jsonl=" + sys.argv[1] + "/x.jsonl"])
from sensor import sensor_cli
config = sensor_cli.load(args)
exporters = sensor_cli.build_exporters(config, "jsonl")
import sensor.engine.live, sensor.enrich.process, sensor.kernel.loader
import sensor.kernel.tracepoints, sensor.metrics
print(json.dumps({"exporters": len(exporters.exporters),
                  "heavy": sorted(m for m in ("pyarrow", "pandas", "duckdb", "bcc")
                                  if m in sys.modules)}))
"""


def test_sensor_run_imports_no_arrow_pandas_duckdb_or_bcc(tmp_path):
    res = subprocess.run([sys.executable, "-c", _RUN_PATH, str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.splitlines()[-1])
    assert out == {"exporters": 3, "heavy": []}
