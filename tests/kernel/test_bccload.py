"""bcc compiles in a child process (sensor/kernel/bccload.py): the sensor gets working
descriptors and never maps LLVM; the child's failures come back as one LoadError."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sensor.kernel import bccload
from tests.conftest import REPO

# Loads both programs as the live sensor does, uses them, and reports what this process
# then maps and holds. The tracepoint must still fire after the child has exited (its
# exit must not disable the perf event we share), and close() must give every
# descriptor back.
_PROBE = r"""
import json, os, socket, sys
from sensor.kernel import loader
from sensor.kernel.tracepoints import load_process_tracepoint
fds_before = len(os.listdir("/proc/self/fd"))
prog = loader.load(loader.LoadOptions(flow_map_size=1024))
tp = load_process_tracepoint()
seen = []
tp.open_events(seen.append)
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen()
cli = socket.create_connection(srv.getsockname())
conn, _ = srv.accept()
for s in (cli, conn, srv):
    s.close()
tp.poll(500)
maps = open("/proc/self/maps").read()
out = {"llvm": "libLLVM" in maps or "libclang" in maps, "bcc": "bcc" in sys.modules,
       "events": len(seen), "calls": tp.counters()["calls"]}
prog.open_events(lambda raw: None)
prog.poll_events(0)
prog.close()
tp.close()
out["fds_leaked"] = len(os.listdir("/proc/self/fd")) - fds_before
print(json.dumps(out))
"""


@pytest.mark.bpf
def test_sensor_process_maps_no_llvm_and_gets_working_descriptors():
    res = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert (out["llvm"], out["bcc"]) == (False, False)
    assert out["events"] >= 1 and out["calls"] >= 1   # the tracepoint fires here
    assert out["fds_leaked"] == 0


@pytest.mark.bpf
def test_compile_error_comes_back_as_one_load_error(tmp_path):
    src = tmp_path / "bad.c"
    src.write_text("int loupe_bad(struct __sk_buff *skb) { return undeclared_name; }\n")
    with pytest.raises(bccload.LoadError) as err:
        bccload.load(src, [], {"loupe_bad": 3})
    assert err.value.stage == "compile"


@pytest.mark.bpf
def test_unknown_program_is_a_load_stage_error(tmp_path):
    src = tmp_path / "ok.c"
    src.write_text("int loupe_ok(struct __sk_buff *skb) { return 0; }\n")
    with pytest.raises(bccload.LoadError) as err:
        bccload.load(src, [], {"loupe_missing": 3})
    assert err.value.stage == "load"
    assert "loupe_missing" in str(err.value)
    obj = bccload.load(src, [], {"loupe_ok": 3})
    try:
        assert set(obj.programs) == {"loupe_ok"} and obj.prog_fd("loupe_ok") >= 0
    finally:
        obj.close()
