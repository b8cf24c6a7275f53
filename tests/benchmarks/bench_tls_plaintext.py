"""What the TLS plaintext probes cost.

1. HTTPS throughput: h2load (HTTP/1.1 over TLS, keep-alive, OpenSSL) against nginx
   (OpenSSL), in two namespaces, without the sensor and with `loupe sensor run
   --tls-plaintext` attached, alternated in one run (off, on, off, on, ...; the median
   of each is compared). Figures: requests/s off and on, their ratio (target >= 0.95),
   and the sensor's CPU time (user + system, from /proc) per 1000 requests while on.
2. Added time per SSL call: an in-memory TLS pair (Python's ssl over MemoryBIOs, so no
   socket or network in the loop) doing write + read of 100 bytes, each one SSL_write_ex
   and one SSL_read_ex, without the probes and with them attached and copying (the
   budget large, the ring drained); and with the object stopped (LOUPE_CTL_DONE, what a
   connection costs once userspace has what it needs). Best of rounds, as timeit does.
   Also the BPF programs' own run time per call (kernel.bpf_stats_enabled).
3. The floor: the same loop with an empty program (r0 = 0; exit) on the same sites,
   entry only and entry + return: what the host's uprobe trap costs before any program
   runs, so (2) minus (3) is ours.

Needs root, nginx and h2load. Run: python -m tests.benchmarks.bench_tls_plaintext [seconds]
"""

from __future__ import annotations

import ctypes
import os
import re
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sensor.kernel import bpfsys, tlsprobe
from sensor.kernel.elfsyms import function_offsets
from sensor.kernel.ringbuf import RingBuffer
from tests.live.rig import Sensor, stop, wait_tcp
from tests.live.tls_peers import certificate, nginx
from tests.netns import VethPair

LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"


# ---- 1. h2load against nginx ----------------------------------------------------------------


def _h2load(pair, seconds: float) -> float:
    # Exit status 1 when -D stops requests in flight; the summary line says what failed.
    run = pair.a.run("h2load", "--h1", "-c", "16", "-t", "1", "-D", f"{seconds:g}",
                     f"https://{pair.b.ip4}/index.html", check=False,
                     timeout=seconds + 60)
    out = run.stdout
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    done = re.search(r"(\d+) succeeded, (\d+) failed", out)
    assert m and done and int(done.group(1)) > 0, (run.returncode, out[-2000:],
                                                   run.stderr[-2000:])
    return float(m.group(1))


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0   # utime + stime, in clock ticks


def throughput(seconds: float, rounds: int = 3) -> dict:
    off, on, cpu_per_1000 = [], [], []
    with tempfile.TemporaryDirectory() as tmp, VethPair.create("bt") as pair:
        work = Path(tmp)
        pair.wait_ready()
        srv = nginx(pair.b, work)
        sensor = None
        try:
            wait_tcp(pair.a, pair.b.ip4, 443)
            _h2load(pair, 1)   # warm-up: nginx's worker, page cache
            for _ in range(rounds):
                off.append(_h2load(pair, seconds))
                sensor = Sensor(["--netns", pair.a.netns, "--iface", pair.a.iface,
                                 "--collector", "", "--spool-dir", str(work / "spool"),
                                 "--tls-plaintext", "--no-process"], workdir=work).start()
                cpu0 = _cpu_s(sensor.proc.pid)
                rps = _h2load(pair, seconds)
                cpu = _cpu_s(sensor.proc.pid) - cpu0
                on.append(rps)
                cpu_per_1000.append(cpu / (rps * seconds) * 1000)
                sensor.stop()
                sensor = None
        finally:
            if sensor is not None:
                sensor.kill()
            stop(srv)
    return {"rps_off": statistics.median(off), "rps_on": statistics.median(on),
            "ratio": statistics.median(on) / statistics.median(off),
            "sensor_cpu_ms_per_1000_requests": 1000 * statistics.median(cpu_per_1000)}


# ---- 2. per SSL call --------------------------------------------------------------------------


def _pair(cert: Path, key: Path):
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert, key)
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.check_hostname = False
    cctx.verify_mode = ssl.CERT_NONE
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = cctx.wrap_bio(c_in, c_out)
    server = sctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):   # the handshake, shuttling records by hand
        for obj in (client, server):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    return client, server, c_out, s_in


def _loop(client, server, c_out, s_in, n: int, drain=None, rounds: int = 5) -> float:
    msg = b"x" * 100
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        for i in range(n):
            client.write(msg)
            s_in.write(c_out.read())
            server.read(4096)
            if drain is not None and i % 256 == 0:
                drain()
        best = min(best, (time.perf_counter_ns() - t0) / n)
    return best


def per_call(n: int = 20000) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        key, cert = certificate(Path(tmp))
        client, server, c_out, s_in = _pair(cert, key)
        base = _loop(client, server, c_out, s_in, n)
        probe = tlsprobe.load()
        ring = RingBuffer()
        seen = set()
        try:
            probe.configure(budget=1 << 30)
            ring.add(probe.events_fd, lambda raw: seen.add(raw[8:16] + raw[32:36]))
            probe.attach_library(LIBSSL, "openssl")
            _loop(client, server, c_out, s_in, 10, drain=lambda: ring.poll(0))
            ring.poll(0)
            # Timed without draining: the copy into the ring is the probes' work, reading
            # it is the sensor's (part 1 measures that); a full ring is counted and cheap.
            stats_fd = bpfsys.enable_run_time_stats()
            try:
                copying = _loop(client, server, c_out, s_in, n)
                prog_ns = _prog_ns_per_call(probe, 5 * n * 2)
            finally:
                os.close(stats_fd)
            for raw in seen:
                obj, tgid = int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")
                probe.write_ctl(tgid, obj, tlsprobe.TlsCtl(flags=tlsprobe.CTL_DONE))
            stopped = _loop(client, server, c_out, s_in, n)
        finally:
            ring.close()
            probe.close()
    return {"ns_per_iteration_off": base,
            "added_ns_per_ssl_call_copying": (copying - base) / 2,
            "added_ns_per_ssl_call_stopped": (stopped - base) / 2,
            "bpf_program_ns_per_ssl_call": prog_ns}


def _prog_ns_per_call(probe: tlsprobe.TlsProbe, calls: int) -> float:
    total = 0
    for fd in probe.program_fds():
        info = Path(f"/proc/self/fdinfo/{fd}").read_text()
        m = re.search(r"run_time_ns:\s+(\d+)", info)
        total += int(m.group(1)) if m else 0
    return total / calls


# ---- 3. the uprobe floor ----------------------------------------------------------------------


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32),
                ("insns", ctypes.c_uint64), ("license", ctypes.c_uint64),
                ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32),
                ("prog_flags", ctypes.c_uint32), ("prog_name", ctypes.c_char * 16)]


def _empty_program() -> int:
    """A kprobe-type program that returns 0 (r0 = 0; exit): what any uprobe costs
    before its program does anything."""
    insns = (ctypes.c_uint64 * 2)(0x00000000000000B7, 0x0000000000000095)
    lic = ctypes.create_string_buffer(b"GPL")
    attr = _ProgLoadAttr(prog_type=tlsprobe.KPROBE, insn_cnt=2,
                         insns=ctypes.addressof(insns), license=ctypes.addressof(lic),
                         prog_name=b"loupe_empty")
    return bpfsys.bpf(5, attr)   # BPF_PROG_LOAD


def floor(n: int = 5000, rounds: int = 5) -> dict:
    """The same in-memory loop (one SSL_write_ex and one SSL_read_ex per iteration) with
    an empty program on both functions' entry, and on entry and return (the sites our
    probes use): the VM's uprobe trap, which no program change can remove. The variants
    alternate, each round attaching and detaching, and the best of each is kept: other
    jobs on the host make single rounds vary by tens of µs."""
    offsets = function_offsets(LIBSSL, {"SSL_write_ex", "SSL_read_ex"})
    best = {"off": float("inf"), "entry": float("inf"), "both": float("inf")}
    with tempfile.TemporaryDirectory() as tmp:
        key, cert = certificate(Path(tmp))
        client, server, c_out, s_in = _pair(cert, key)
        prog = _empty_program()
        try:
            for _ in range(rounds):
                for variant, sites in (("off", ()), ("entry", (False,)),
                                       ("both", (False, True))):
                    links = [tlsprobe.attach_uprobe(prog, LIBSSL, off, ret=ret)
                             for off in offsets.values() for ret in sites]
                    try:
                        t = _loop(client, server, c_out, s_in, n, rounds=1)
                    finally:
                        for fd in links:
                            os.close(fd)
                    best[variant] = min(best[variant], t)
        finally:
            os.close(prog)
    return {"ns_per_iteration_off": best["off"],
            "empty_uprobe_ns_per_call": (best["entry"] - best["off"]) / 2,
            "empty_uprobe_and_uretprobe_ns_per_call": (best["both"] - best["off"]) / 2}


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    print("uprobe floor:", {k: round(v, 1) for k, v in floor().items()})
    print("per SSL call:", {k: round(v, 1) for k, v in per_call().items()})
    print("h2load vs nginx:", {k: round(v, 3) for k, v in throughput(seconds).items()})


if __name__ == "__main__":
    main()
