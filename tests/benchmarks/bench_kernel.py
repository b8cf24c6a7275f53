"""Flow meter overhead, three ways.

    sudo .venv/bin/python -m tests.benchmarks.bench_kernel [--rounds 30] [--phase 1] [--meters loupe,tcpdump]
    sudo .venv/bin/python -m tests.benchmarks.bench_kernel --micro
    sudo .venv/bin/python -m tests.benchmarks.bench_kernel --read

- default: one long iperf3 test across a veth pair per kind (TCP, then 64-byte UDP),
  during which each meter is switched on and off in turn, one phase a second: bare,
  Loupe, bare, softflowd, bare, tcpdump, bare, pmacctd, bare, Loupe, ... (--rounds
  phases per meter). Loupe's program is attached (tcx where the kernel has it) and
  detached; the capture-based meters ops would otherwise run are started and stopped
  as processes on the same interface: `softflowd -i IF` and `pmacctd -i IF` (libpcap
  on AF_PACKET) and `tcpdump -i IF -s 96 -w /dev/null`. A process counts as on once its
  packet socket is open; every phase, bare ones included, starts --settle seconds after
  the switch so that start-up and tear-down fall outside the measured second. A peer
  that is not installed is left out (`--meters` picks them).
  iperf3's client and server are pinned to a core each. The rate of each phase is read
  from the receiving interface's counters (bytes for TCP, packets for UDP). It prints,
  per meter, the TCP throughput ratio and the 64-byte UDP packet-rate ratio: each of
  its phases against the mean of the bare phases either side of it, the median of
  those (Loupe's target >= 0.95), and the ratio of all its phases to all bare phases
  beside it. Phases a
  second apart see the same machine: separate tests a few seconds apart differed by
  up to 25% on a shared VM, which no number of rounds averaged out. Then the kernel's
  drop counters (must stay 0), and the program's own cost per run while attached
  (BPF_ENABLE_STATS: run_time_ns / run_cnt), measured in tests of their own after the
  ratio runs (timing every run costs the kernel two clock reads per packet, which
  would otherwise be charged to the program).
- --micro: the program's cost per packet through BPF_PROG_TEST_RUN with many
  repetitions, per kind of packet (fast path, locked path, selected flow with payload),
  minus an empty program's cost (the test-run loop itself).
- --read: the reader's cost at a full 65536-entry map: one BPF_MAP_LOOKUP_BATCH
  snapshot, the per-key walk it replaces, and a whole collect() cycle.

The load average is printed with every result: other work shares the cores.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sensor.clock import SystemClock
from sensor.kernel import abi, attach, bpfsys, loader, testrun
from sensor.kernel.counters import possible_cpus, read_counters
from sensor.kernel.flowmap import BATCH, FlowMapReader
from sensor.kernel.hybrid import KernelSensor, SelectionConfig
from tests.kernel.conftest import attached, in_netns
from tests.netns import VethPair

DROP_COUNTERS = (abi.Counter.FLOW_MAP_FULL, abi.Counter.RINGBUF_FULL,
                 abi.Counter.TRUNCATED, abi.Counter.BAD_HEADER,
                 abi.Counter.UNSUPPORTED_ENCAP, abi.Counter.FRAG_NO_FIRST,
                 abi.Counter.IPV6_EXT_TOO_LONG, abi.Counter.RECYCLED_ENTRY)

MAC = bytes.fromhex("020000000002020000000001")


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def _affinity() -> tuple[str, ...]:
    """iperf3's client on CPU 0 and server on CPU 1, when there are two: left to the
    scheduler, the two trade cores mid-test and one 64-byte UDP test differs from the
    next by up to 20%; pinned, by about 3%."""
    return ("-A", "0,1") if len(os.sched_getaffinity(0)) >= 2 else ()


def _iperf(pair: VethPair, seconds: float, *args: str) -> dict:
    args = (*_affinity(), *args)
    srv = pair.b.popen("iperf3", "-s", "-1", stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    time.sleep(0.3)  # let the server listen before the first try
    try:
        for _ in range(50):
            r = pair.a.run("iperf3", "-c", pair.b.ip4, "-J", "-t", str(int(seconds)), *args,
                           check=False, timeout=seconds + 30)
            if r.returncode == 0:
                return json.loads(r.stdout)
            time.sleep(0.1)  # the server is not listening yet
        srv.kill()
        raise RuntimeError(f"iperf3 failed: {r.stdout[-500:]} {r.stderr[-500:]}")
    finally:
        try:
            srv.wait(timeout=5)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait()


UDP64 = ("-u", "-l", "64", "-b", "0")


def tcp_bps(pair, seconds) -> float:
    return _iperf(pair, seconds)["end"]["sum_received"]["bits_per_second"]


def udp_pps(pair, seconds) -> float:
    s = _iperf(pair, seconds, *UDP64)["end"]["sum"]
    return (s["packets"] - s["lost_packets"]) / s["seconds"]


def _ns_per_run(prog_fd: int, before: bpfsys.ProgInfo) -> tuple[float, int]:
    after = bpfsys.prog_info(prog_fd)
    runs = after.run_cnt - before.run_cnt
    return ((after.run_time_ns - before.run_time_ns) / runs if runs else 0.0), runs


def _received(netns: str, iface: str) -> tuple[int, int]:
    """(bytes, packets) iface in netns has received so far: /proc/net/dev as this
    thread sees it, inside netns."""
    with in_netns(netns), open("/proc/thread-self/net/dev") as f:
        for line in f:
            name, _, counters = line.partition(":")
            if name.strip() == iface:
                fields = counters.split()
                return int(fields[0]), int(fields[1])
    raise RuntimeError(f"{iface} not found in netns {netns}")


class LoupeMeter:
    """Loupe's flow program, attached to b's interface for a phase and detached after."""

    name = "loupe"

    def __init__(self, pair: VethPair, prog_fd: int) -> None:
        self.pair, self.prog_fd, self.link = pair, prog_fd, None

    def on(self) -> None:
        with in_netns(self.pair.b.netns):
            self.link = attach.attach(self.pair.b.iface, self.prog_fd)

    def off(self) -> None:
        if self.link is not None:
            with in_netns(self.pair.b.netns):
                attach.detach(self.link)
            self.link = None


class CaptureMeter:
    """A capture-based meter: a process started on b's interface for a phase and stopped
    after. It is on once it holds a packet socket in b's namespace (nothing else there
    does), so the phase does not start while libpcap is still opening."""

    def __init__(self, name: str, pair: VethPair, argv: list[str]) -> None:
        self.name, self.pair, self.argv, self.proc = name, pair, argv, None

    def on(self) -> None:
        # Its own session: pmacctd forks plugin processes, stopped with it as a group.
        self.proc = self.pair.b.popen(*self.argv, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 10
        while not self._capturing():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode(errors="replace")[-300:] \
                    if self.proc.poll() is not None else "no packet socket after 10 s"
                self.off()
                raise RuntimeError(f"{self.name} did not start: {err}")
            time.sleep(0.01)

    def _capturing(self) -> bool:
        try:
            with open(f"/proc/{self.proc.pid}/net/packet") as f:
                return len(f.readlines()) > 1
        except OSError:
            return False

    def off(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.proc = None


def peer_meters(pair: VethPair, workdir: Path, wanted: set[str]) -> list[CaptureMeter]:
    """The capture-based meters that are installed and wanted, each writing nothing it
    keeps: softflowd exports NetFlow v10 to a closed local port, tcpdump writes
    /dev/null, pmacctd's print plugin writes to /dev/null once a minute."""
    iface = pair.b.iface
    conf = workdir / "pmacctd.conf"
    conf.write_text(f"daemonize: false\npcap_interface: {iface}\nplugins: print\n"
                    "aggregate: src_host, dst_host, src_port, dst_port, proto\n"
                    "print_output_file: /dev/null\nprint_refresh_time: 60\n")
    known = {
        "softflowd": ["softflowd", "-d", "-i", iface, "-v", "10", "-n", "127.0.0.1:9",
                      "-p", str(workdir / "softflowd.pid"), "-c", str(workdir / "sf.ctl")],
        "tcpdump": ["tcpdump", "-i", iface, "-s", "96", "-w", "/dev/null"],
        "pmacctd": ["pmacctd", "-f", str(conf)],
    }
    meters = []
    for name, argv in known.items():
        if name not in wanted:
            continue
        if shutil.which(argv[0]) is None:
            print(f"{name}: not installed, left out", flush=True)
            continue
        meters.append(CaptureMeter(name, pair, argv))
    return meters


def alternating(pair: VethPair, meters: list, iperf_args: tuple[str, ...], *, rounds: int,
                phase: float, settle: float, unit: int) -> list[tuple[str, float]]:
    """One iperf3 test from a to b while the meters take turns on b's interface, each
    phase of one meter between two bare ones: bare, m1, bare, m2, ..., bare (rounds
    phases per meter). Returns (meter name or "", rate) per phase: bytes/s (unit 0) or
    packets/s (unit 1) received by b."""
    plan = [meters[i % len(meters)] for i in range(rounds * len(meters))]
    phases = 2 * len(plan) + 1
    srv = pair.b.popen("iperf3", "-s", "-1", stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    time.sleep(0.3)  # let the server listen
    # Long enough for every phase and each switch, with room to spare; stopped when the
    # phases are done.
    length = int(phases * (phase + settle) * 1.5) + 5
    client = pair.a.popen("iperf3", "-c", pair.b.ip4, "-t", str(length),
                          *_affinity(), *iperf_args, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
    rates: list[tuple[str, float]] = []
    current = None
    try:
        time.sleep(1.5)  # connected and at full rate
        if client.poll() is not None:
            raise RuntimeError(f"iperf3 client ended early: {client.stderr.read()[-500:]}")
        for i in range(phases):
            if i % 2:
                current = plan[i // 2]
                current.on()
            elif current is not None:
                current.off()
                current = None
            time.sleep(settle)
            t0, c0 = time.monotonic(), _received(pair.b.netns, pair.b.iface)[unit]
            time.sleep(phase)
            t1, c1 = time.monotonic(), _received(pair.b.netns, pair.b.iface)[unit]
            rates.append((current.name if current else "", (c1 - c0) / (t1 - t0)))
        if client.poll() is not None:
            raise RuntimeError(f"iperf3 client ended early: {client.stderr.read()[-500:]}")
    finally:
        if current is not None:
            current.off()
        for proc in (client, srv):
            proc.kill()
            proc.wait()
    return rates


def phase_ratios(rates: list[tuple[str, float]], name: str) -> list[float]:
    """Each phase of meter `name` over the mean of the bare phases either side."""
    return [rates[i][1] / ((rates[i - 1][1] + rates[i + 1][1]) / 2)
            for i in range(1, len(rates) - 1) if rates[i][0] == name]


def iperf_main(args) -> int:
    prog = loader.load()
    wanted = set(args.meters.split(","))
    ratios: dict[tuple[str, str], list[float]] = {}
    means: dict[tuple[str, str], float] = {}
    cost: dict[str, list[float]] = {"tcp": [], "udp": []}
    with VethPair.create("kb") as pair, tempfile.TemporaryDirectory() as tmp:
        pair.wait_ready()
        meters = ([LoupeMeter(pair, prog.prog_fd)] if "loupe" in wanted else [])
        meters += peer_meters(pair, Path(tmp), wanted)
        if not meters:
            raise SystemExit(f"no meter to measure among {args.meters!r}")
        for kind, iperf_args, unit in (("tcp", (), 0), ("udp", UDP64, 1)):
            rates = alternating(pair, meters, iperf_args, rounds=args.rounds,
                                phase=args.phase, settle=args.settle, unit=unit)
            off = [r for m, r in rates if not m]
            for meter in meters:
                ratios[meter.name, kind] = phase_ratios(rates, meter.name)
                on = [r for m, r in rates if m == meter.name]
                means[meter.name, kind] = statistics.mean(on) / statistics.mean(off)
            what = "Gbit/s" if kind == "tcp" else "kpps"
            scale = 8e-9 if kind == "tcp" else 1e-3
            print(f"{kind}: {' '.join((m[:1] or '-') + f'{r * scale:.1f}' for m, r in rates)}"
                  f" {what} (- bare, else the meter's initial); {_load()}", flush=True)
        # Cost tests: attached, with run-time statistics on (BPF_ENABLE_STATS).
        if "loupe" in wanted:
            stats_fd = bpfsys.enable_run_time_stats()
            try:
                with attached(pair.b.netns, pair.b.iface, prog.prog_fd):
                    for _ in range(args.cost_rounds):
                        for kind, fn in (("tcp", tcp_bps), ("udp", udp_pps)):
                            before = bpfsys.prog_info(prog.prog_fd)
                            fn(pair, 3)
                            cost[kind].append(_ns_per_run(prog.prog_fd, before)[0])
            finally:
                os.close(stats_fd)
    counters = read_counters(prog.counters_fd, possible_cpus())
    prog.close()
    drops = {c.name.lower(): counters[c] for c in DROP_COUNTERS if counters[c]}
    print(f"{args.rounds} phases of {args.phase:g} s per meter and test, each between two "
          f"bare ones, {args.settle:g} s after each switch")
    print(f"{'meter':<10} {'tcp throughput ratio':>34} {'udp 64-byte packet-rate ratio':>34}")
    for meter in meters:
        cells = [f"{statistics.median(ratios[meter.name, k]):.3f} "
                 f"({_quartiles(ratios[meter.name, k])}; all {means[meter.name, k]:.3f})"
                 for k in ("tcp", "udp")]
        print(f"{meter.name:<10} {cells[0]:>34} {cells[1]:>34}")
    print("(median of the phases' ratios against the bare phases either side; quartiles; "
          "all its phases over all bare phases)")
    if cost["tcp"]:
        print(f"loupe program cost while attached (ns per run with run-time stats on, median "
              f"of {args.cost_rounds} tests): tcp {statistics.median(cost['tcp']):.0f}, "
              f"udp64 {statistics.median(cost['udp']):.0f}")
    print(f"packets metered by loupe: {counters[abi.Counter.PACKETS]}; kernel drop counters: "
          f"{drops or 'none raised'}; {_load()}")
    return 0 if not drops else 1


def _quartiles(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4)
    return f"{q[0]:.3f}-{q[2]:.3f}"


def _frame(*, proto: int, sport: int, dport: int, payload: int, flags: int = 0x10) -> bytes:
    """An Ethernet/IPv4 frame from 198.18.9.1 to 198.18.9.2, built by hand (fast)."""
    if proto == 6:
        l4 = (sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + (1).to_bytes(4, "big")
              + (1).to_bytes(4, "big") + bytes([0x50, flags]) + b"\xff\xff\0\0\0\0")
    else:
        l4 = (sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
              + (8 + payload).to_bytes(2, "big") + b"\0\0")
    total = 20 + len(l4) + payload
    ip = (bytes([0x45, 0]) + total.to_bytes(2, "big") + b"\0\0\0\0\x40" + bytes([proto])
          + b"\0\0" + bytes([198, 18, 9, 1, 198, 18, 9, 2]))
    return MAC + b"\x08\x00" + ip + l4 + b"p" * payload


def micro_main(args) -> int:
    from bcc import BPF  # noqa: PLC0415 (only this mode compiles a second program)

    empty = BPF(text=b"int f(struct __sk_buff *s) { return -1; }")
    empty_fd = empty.load_func(b"f", BPF.SCHED_CLS).fd
    prog = loader.load()
    sensor = KernelSensor(prog, SystemClock(),
                          selection=SelectionConfig(ports={80}, sniff=False,
                                                    budget=(1 << 31, 1 << 31)))
    cases = {
        "tcp 1448 B, unselected (fast path)": _frame(proto=6, sport=40000, dport=5201,
                                                      payload=1448),
        "udp 22 B, unselected (fast path)": _frame(proto=17, sport=40001, dport=5201,
                                                   payload=22),
        "tcp FIN, unselected (locked path)": _frame(proto=6, sport=40002, dport=5201,
                                                    payload=0, flags=0x11),
        "tcp 1448 B, selected, copied": _frame(proto=6, sport=40003, dport=80, payload=1448),
    }
    reps = args.repeat

    def cost(fd, frame) -> float:
        testrun.run_skb(fd, frame)
        return statistics.median(testrun.run_skb(fd, frame, repeat=reps).duration_ns
                                 for _ in range(7))

    base = cost(empty_fd, cases["udp 22 B, unselected (fast path)"])
    print(f"empty program (test-run loop): {base:.0f} ns; {_load()}")
    for name, frame in cases.items():
        c = cost(prog.prog_fd, frame)
        sensor.poll(0)
        list(sensor.payload_events())
        print(f"{name:<40} {c - base:6.0f} ns per packet (raw {c:.0f})")
    info = bpfsys.prog_info(prog.prog_fd)
    print(f"program: {info.xlated_len // 8} instructions, verifier walked "
          f"{info.verified_insns}")
    prog.close()
    empty.cleanup()
    return 0


def read_main(args) -> int:
    entries = 65536
    prog = loader.load(loader.LoadOptions(flow_map_size=entries))
    template = bytearray(_frame(proto=17, sport=0, dport=53, payload=10))
    started = time.monotonic()
    for i in range(entries):   # distinct flows: source address low byte x source port
        template[29] = 1 + (i >> 14)
        template[34:36] = (1024 + (i & 0x3FFF)).to_bytes(2, "big")
        testrun.run_skb(prog.prog_fd, bytes(template))
    print(f"filled {entries} flows in {time.monotonic() - started:.1f} s; {_load()}")

    keys, values = (abi.FlowKey * entries)(), (abi.FlowValue * entries)()
    t = time.perf_counter()
    n = bpfsys.lookup_batch_into(prog.flows_fd, keys, values, batch=BATCH, lock=True)
    batch_s = time.perf_counter() - t
    assert n == entries, n
    t = time.perf_counter()
    snap = bpfsys.lookup_batch(prog.flows_fd, abi.FlowKey, abi.FlowValue, batch=BATCH,
                               lock=True)
    objects_s = time.perf_counter() - t
    assert len(snap) == entries, len(snap)

    t = time.perf_counter()
    walked = _walk(prog.flows_fd)
    walk_s = time.perf_counter() - t
    assert walked == entries, walked

    reader = FlowMapReader(prog.flows_fd, SystemClock())
    t = time.perf_counter()
    reader.collect()
    first_s = time.perf_counter() - t
    t = time.perf_counter()
    reader.collect()
    second_s = time.perf_counter() - t
    print(f"BPF_MAP_LOOKUP_BATCH snapshot of {entries} into arrays: {batch_s * 1e3:.0f} ms "
          f"({batch_s / entries * 1e9:.0f} ns per entry); as ctypes objects: "
          f"{objects_s * 1e3:.0f} ms")
    print(f"per-key walk (GET_NEXT_KEY + LOOKUP with BPF_F_LOCK): {walk_s * 1e3:.0f} ms")
    print(f"reader.collect() at a full map: first {first_s * 1e3:.0f} ms, "
          f"next {second_s * 1e3:.0f} ms; {_load()}")
    prog.close()
    return 0


def _walk(fd: int) -> int:
    """The old way: one get-next-key and one locked lookup per entry."""
    key, nxt, value = abi.FlowKey(), abi.FlowKey(), abi.FlowValue()
    n = 0
    first = True
    while True:
        attr = bpfsys._MapElemAttr(map_fd=fd, key=0 if first else ctypes.addressof(key),
                                   value=ctypes.addressof(nxt))
        try:
            bpfsys.bpf(bpfsys.BPF_MAP_GET_NEXT_KEY, attr)
        except bpfsys.BpfError:
            return n
        first = False
        ctypes.memmove(ctypes.addressof(key), ctypes.addressof(nxt), ctypes.sizeof(key))
        bpfsys.lookup(fd, key, value, lock=True)
        n += 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 30 phases of 1 s per meter and test (about 10 minutes with four meters): one
    # phase's ratio varies by ~5% on this shared VM, so the median of 30 is within ~1%.
    ap.add_argument("--rounds", type=int, default=30, help="phases per meter and test")
    ap.add_argument("--phase", type=float, default=1.0, help="seconds per phase")
    ap.add_argument("--settle", type=float, default=0.25,
                    help="seconds between a switch and the phase it starts")
    ap.add_argument("--meters", default="loupe,softflowd,tcpdump,pmacctd",
                    help="comma-separated: loupe softflowd tcpdump pmacctd")
    ap.add_argument("--cost-rounds", type=int, default=2)
    ap.add_argument("--micro", action="store_true", help="per-packet cost by test run")
    ap.add_argument("--read", action="store_true", help="reader cost at a full map")
    ap.add_argument("--repeat", type=int, default=200_000, help="test-run repetitions")
    args = ap.parse_args(argv)
    if args.micro:
        return micro_main(args)
    if args.read:
        return read_main(args)
    return iperf_main(args)


if __name__ == "__main__":
    sys.exit(main())
