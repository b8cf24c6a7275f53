"""Process attribution overhead.

Kernel: TCP connections to a loopback listener (connect, accept, close: about seven
inet_sock_set_state calls each) with bpf/process.c attached and without, alternating
rounds; with kernel.bpf_stats_enabled on for the attached rounds (restored after), the
program's own run time per call, hence the calls per second one CPU could handle.
Userspace: the recorded events replayed through ProcessAttributor.handle_event (cold:
every pid read from /proc; warm: the pid cache hit), and lookup() for a hit and a miss.

    sudo .venv/bin/python -m tests.benchmarks.bench_process [--connections 2000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from pathlib import Path

from sensor.enrich.process import (
    KIND_CONNECT, EventDecoder, ProcessAttributor, ProcessLimits, ProcEvent,
)
from sensor.kernel.tracepoints import load_process_tracepoint

STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")


def _connections(n: int) -> float:
    """Connections per second: connect, accept and close n times over loopback."""
    srv = socket.create_server(("127.0.0.1", 0), backlog=128)
    addr = srv.getsockname()
    start = time.perf_counter()
    for _ in range(n):
        c = socket.create_connection(addr)
        a, _ = srv.accept()
        c.close()
        a.close()
    elapsed = time.perf_counter() - start
    srv.close()
    return n / elapsed


class _Recording:
    """The tracepoint as an event source that also keeps every raw event."""

    def __init__(self, tp, sink: list[bytes]) -> None:
        self._tp, self._sink = tp, sink

    def open_events(self, handler) -> None:
        def _both(raw: bytes) -> None:
            self._sink.append(raw)
            handler(raw)

        self._tp.open_events(_both)

    def poll(self, timeout_ms: int) -> None:
        self._tp.poll(timeout_ms)

    def wake(self) -> None:
        self._tp.wake()

    def counters(self) -> dict[str, int]:
        return self._tp.counters()

    def close(self) -> None:
        self._tp.close()


def _prog_stats(fds: list[int]) -> tuple[int, int]:
    cnt = ns = 0
    for fd in fds:
        for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "run_cnt":
                cnt += int(value)
            elif key == "run_time_ns":
                ns += int(value)
    return cnt, ns


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    bare, attached = [], []
    raw_events: list[bytes] = []
    old_stats = STATS_SYSCTL.read_text().strip()
    calls = run_ns = 0
    try:
        STATS_SYSCTL.write_text("1")
        for _ in range(args.rounds):
            bare.append(_connections(args.connections))
            tp = load_process_tracepoint()
            att = ProcessAttributor(_Recording(tp, raw_events))
            att.start()
            fds = tp.program_fds()
            c0, n0 = _prog_stats(fds)
            attached.append(_connections(args.connections))
            c1, n1 = _prog_stats(fds)
            calls, run_ns = calls + c1 - c0, run_ns + n1 - n0
            time.sleep(0.2)
            stats = att.stats()
            att.close()
            assert stats["kernel_ringbuf_full"] == 0, stats
    finally:
        STATS_SYSCTL.write_text(old_stats)

    b, a = statistics.median(bare), statistics.median(attached)
    print(f"connections/s over loopback: bare {b:,.0f}, attached {a:,.0f} "
          f"(ratio {a / b:.3f})")
    per_call = run_ns / calls if calls else float("nan")
    print(f"tracepoint program: {calls:,} calls, {per_call:.0f} ns per call "
          f"(~{1e9 / per_call / 1e6:.1f} M calls/s per CPU), "
          f"{len(raw_events):,} events sent")

    for label, limits in (("cold (pid cache size 1, every event reads /proc)",
                           ProcessLimits(max_pids=1)),
                          ("warm (pid cache hit)", ProcessLimits())):
        att = ProcessAttributor(limits=limits)
        mine = list(raw_events)
        if limits.max_pids == 1:
            # Alternate two live pids so every event misses the one-entry cache.
            pids = (os.getpid(), os.getppid())
            patched = []
            for i, r in enumerate(mine):
                ev = ProcEvent.from_buffer_copy(r)
                if ev.flags:
                    ev.pid = pids[i % 2]
                    ev.comm = b""
                patched.append(bytes(ev))
            mine = patched
        start = time.perf_counter()
        for r in mine:
            att.handle_event(r)
        per_event = (time.perf_counter() - start) / len(mine) * 1e6
        print(f"userspace handle_event, {label}: {per_event:.1f} us/event "
              f"(~{per_event * len(mine) / args.connections / args.rounds:.1f} us "
              f"per connection)")

    att = ProcessAttributor(limits=ProcessLimits())
    for r in raw_events:
        att.handle_event(r)
    decoded = (EventDecoder().decode(r) for r in raw_events)
    ev = next(e for e in decoded if e is not None and e.kind == KIND_CONNECT)
    hit_key = (6, *ev.local, *ev.remote)
    miss_key = (6, "198.18.250.1", 1, "198.18.250.2", 2)
    att.lookup(miss_key)      # builds the socket tables once
    for label, key in (("hit", hit_key), ("miss (not local)", miss_key)):
        n = 20000
        start = time.perf_counter()
        for _ in range(n):
            att.lookup(key)
        print(f"lookup {label}: {(time.perf_counter() - start) / n * 1e6:.2f} us")
    start = time.perf_counter()
    att._sockets._rebuild()   # noqa: SLF001 (the cost of one socket-table rebuild)
    print(f"socket table rebuild ({len(os.listdir('/proc'))} /proc entries): "
          f"{(time.perf_counter() - start) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
