"""`loupe sensor flows`: attach the flow meter to interfaces and print finished flows
live, in the table (on a terminal) or any record format (sensor/output.py: json, eve,
zeek, to stdout or -o FILE); print the kernel counters on exit.

Shutdown order (SIGINT, SIGTERM or an error): detach from every interface first, so
the program stops seeing packets, then drain the map (every flow as FORCED_END), drain
the ring buffer, print the last records and the counters.
"""

from __future__ import annotations

import signal
import sys
import time
from typing import TextIO

from sensor.clock import SystemClock
from sensor.errors import ConfigError
from sensor.flow.semantics import NS, Timeouts
from sensor.kernel import abi, attach, loader
from sensor.kernel.counters import CounterWatcher
from sensor.kernel.events import EventDecoder
from sensor.kernel.flowmap import FlowMapReader
from sensor.output import RecordOut, add_output_arguments, resolve

FORMATS = ("table", "json", "eve", "zeek")

# How long one ring buffer poll blocks: the loop's reaction time to a signal and to
# flow-end events.
POLL_MS = 100

# After detaching, program runs that began before it may still be finishing (the
# filter is freed after an RCU grace period, typically well under 10 ms); the final
# drain waits this long so their packets are in the map it reads.
DETACH_SETTLE_S = 0.05


def register(tree) -> None:
    p = tree.command("sensor flows", help="meter flows in the kernel and print them live")
    p.add_argument("--iface", action="append", required=True, metavar="IF",
                   help="interface to attach to (repeat for several)")
    add_output_arguments(p, FORMATS)
    p.add_argument("--idle-timeout", type=float, default=None, metavar="SECONDS",
                   help="idle timeout for every protocol (default: TCP 300, others 60)")
    p.add_argument("--active-timeout", type=float, default=1800.0, metavar="SECONDS")
    p.add_argument("--linger", type=float, default=5.0, metavar="SECONDS",
                   help="wait after a TCP flow ended before exporting it")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                   help="how often the flow map is read")
    p.add_argument("--flow-map-size", type=int, default=65536, metavar="N")
    p.add_argument("--duration", type=float, default=0.0, metavar="SECONDS",
                   help="stop after this long (0: until interrupted)")
    p.set_defaults(func=run)


def timeouts_from(args) -> Timeouts:
    try:
        base = Timeouts(active_ns=int(args.active_timeout * NS),
                        tcp_end_linger_ns=int(args.linger * NS))
        if args.idle_timeout is not None:
            idle = int(args.idle_timeout * NS)
            base = Timeouts(tcp_idle_ns=idle, other_idle_ns=idle, active_ns=base.active_ns,
                            tcp_end_linger_ns=base.tcp_end_linger_ns)
    except ValueError as exc:
        raise ConfigError(f"bad timeout: {exc}; timeouts must be positive seconds") from None
    floor = 2 * abi.RETIRE_GUARD_NS
    if min(base.tcp_idle_ns, base.other_idle_ns) < floor:
        raise ConfigError(f"--idle-timeout must be at least {floor / NS:g} seconds")
    return base


class _Stop:
    """Set by SIGINT/SIGTERM; the loop checks it between polls."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum, frame) -> None:
        self.requested = True


def run(args, out: TextIO | None = None) -> int:
    target = resolve(args, FORMATS, stdout=out)
    timeouts_from(args)   # a bad flag fails before the output file is created
    sink = RecordOut(target, stdout=out)
    try:
        return _run(args, sink)
    finally:
        sink.close()


def _run(args, sink: RecordOut) -> int:
    timeouts = timeouts_from(args)
    if args.interval <= 0:
        raise ConfigError("--interval must be positive seconds")
    for iface in args.iface:
        attach.meterable_interface(iface)  # fail fast, before compiling
    prog = loader.load(loader.LoadOptions(flow_map_size=args.flow_map_size))
    clock = SystemClock()
    reader = FlowMapReader(prog.flows_fd, clock, timeouts=timeouts)
    decoder = EventDecoder()
    prog.open_events(lambda raw: reader.on_event(decoder.decode(raw)))
    watcher = CounterWatcher(prog.counters_fd)
    stop = _Stop()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    attachments = []

    def emit(flows, losses) -> None:
        for f in flows:
            sink.write(f)
        for lost in losses:
            sink.write(lost)
        sink.flush()

    try:
        for iface in args.iface:
            attach.cleanup_stale(iface)
            attachments.append(attach.attach(iface, prog.prog_fd))
        started = time.monotonic()
        next_read = started + args.interval
        while not stop.requested:
            prog.poll_events(POLL_MS)
            now = time.monotonic()
            if args.duration and now - started >= args.duration:
                break
            if now >= next_read or reader.end_seen:
                emit(reader.collect(), watcher.poll(clock.wall_ns()))
                next_read = now + args.interval
    finally:
        for att in attachments:
            attach.detach(att)
        for s, handler in previous.items():
            signal.signal(s, handler)
        time.sleep(DETACH_SETTLE_S)
        reader.drain()
        prog.poll_events(0)
        emit(reader.flush(), watcher.poll(clock.wall_ns()))
        totals = watcher.totals()
        prog.close()
        print("kernel counters:", file=sys.stderr)
        for counter, value in totals.items():
            print(f"  {counter.name.lower():<20}{value:>14}", file=sys.stderr)
        print(f"  {'late_unmatched':<20}{reader.stats.late_unmatched:>14}", file=sys.stderr)
    return 0
