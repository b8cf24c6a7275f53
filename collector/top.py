"""`loupe top`: a full-screen live view over the collector's stream, drawn with textual.

Two threads. The feed thread holds one Observer.Subscribe stream (follow, with the same
filter flags as `loupe tail`), turns each record into a model record and adds it to the
TopModel under a lock. The UI (textual's event loop) takes the panels' rows under that
lock once a second and updates its tables in place. A burst of records can slow the feed,
never the keys or the drawing; the collector drops records for a subscriber that falls
behind and says so with a LostEvent, which the "Lost events" panel and the status line
show.

Unreachable at start: one line and exit status 1, like `tail`. Gone mid-run: the status
line says so and the feed retries every RETRY_S seconds, keeping what it has counted. A
subscription the collector refuses (FATAL) is shown and not retried.
"""

from __future__ import annotations

import argparse
import io
import sys
import threading
import time
from typing import Callable

import grpc
from rich.console import Console
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.coordinate import Coordinate
from textual.widgets import DataTable, Footer, Static

from collector import cli, top_model as tm
from collector.client import open_channel, translate
from sensor.errors import ConfigError
from sensor.export import wire

REFRESH_S = 1.0
RETRY_S = 2.0
# A Status call proves the collector answers before the stream opens (a follow stream
# sends nothing until a record arrives, so it cannot say "connected" by itself).
CONNECT_TIMEOUT_S = 5.0
# Answers that retrying cannot change: a refused filter, a certificate without the
# analyst role, a collector without Observer.
FATAL = frozenset((grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
                   grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED))
ROWS = 50  # per panel: more than a screen shows, few enough to redraw every second


class Feed:
    """The feed thread: Subscribe, add records to the model, retry when the stream breaks."""

    def __init__(self, connect: Callable[[], grpc.Channel], request, model: tm.TopModel,
                 lock: threading.Lock, address: str,
                 clock: Callable[[], int] = time.monotonic_ns, retry_s: float = RETRY_S) -> None:
        self.connect = connect
        self.request = request
        self.model = model
        self.lock = lock
        self.address = address
        self.clock = clock
        self.retry_s = retry_s
        self.state = "connecting"
        self.error = ""
        self.connects = 0
        self._stop = threading.Event()
        self._call = None
        self._thread = threading.Thread(target=self._run, name="loupe-top-feed", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()
        self._thread.join(5)

    def _run(self) -> None:
        from loupe.v1 import observer_pb2_grpc

        while not self._stop.is_set():
            # A new channel per attempt: a channel that lost its peer backs off up to
            # two minutes between reconnects, and the view should be back within RETRY_S
            # of the collector.
            channel = self.connect()
            stub = observer_pb2_grpc.ObserverStub(channel)
            try:
                stub.Status(wire.observer_pb2.StatusRequest(), timeout=CONNECT_TIMEOUT_S)
                self._call = stub.Subscribe(self.request)
                if self._stop.is_set():
                    self._call.cancel()
                self.state, self.error = "connected", ""
                self.connects += 1
                for resp in self._call:
                    rec = wire.from_proto(resp.record)
                    with self.lock:
                        self.model.add(rec, self.clock())
                self.error = "the collector ended the stream"
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    return
                self.error = str(translate(exc, self.address))
                if exc.code() in FATAL:
                    self.state = "failed"  # asking again gets the same answer
                    return
            except Exception as exc:  # a bug: say so on screen, where the user looks
                self.state, self.error = "failed", f"the feed stopped: {exc!r}"
                return
            finally:
                channel.close()
            self.state = "disconnected"
            self._stop.wait(self.retry_s)


def screen_text(app: App) -> str:
    """The screen as plain text: what App.export_screenshot draws, without the SVG."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True,
                      color_system="truecolor", record=True, legacy_windows=False,
                      safe_box=False)
    # The same compositor call App.export_screenshot makes; textual has no public text
    # export, and the test pins this down on every textual version we install.
    console.print(app.screen._compositor.render_update(full=True))
    return "\n".join(line.rstrip() for line in console.export_text(styles=False).splitlines())


class TopApp(App):
    """The view: a status line, five panels, a footer of keys."""

    TITLE = "loupe top"
    CSS = """
    #status { height: 1; padding: 0 1; background: $boost; }
    DataTable { height: 1fr; border: round $primary-darken-2; border-title-color: $text; }
    DataTable:focus { border: round $accent; }
    Horizontal { height: 1fr; }
    #services { height: 1fr; }
    #endpoints { width: 5fr; }
    #talkers { width: 4fr; }
    #dns, #lost { width: 1fr; }
    #bottom { height: 10; }
    """
    BINDINGS = [
        ("q", "quit", "quit"),
        # Ctrl-C quits, as it does top and every other command here (textual would only
        # tell how to quit).
        Binding("ctrl+c", "quit", show=False, priority=True),
        ("p", "pause", "pause"),
        ("s", "sort", "sort column"),
        ("r", "reverse", "reverse"),
        ("t", "talkers", "pairs/addresses"),
        *((str(i), f"focus('{name}')", name) for i, name in enumerate(tm.PANELS, 1)),
    ]

    def __init__(self, feed: Feed, *, filters: str = "", refresh_s: float = REFRESH_S,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        super().__init__()
        self.feed = feed
        self.model = feed.model
        self.lock = feed.lock
        self.filters = filters
        self.refresh_s = refresh_s
        self.clock = clock
        self.paused = False
        self.sort: dict[str, int | None] = dict.fromkeys(tm.PANELS)
        self.reverse: dict[str, bool] = dict.fromkeys(tm.PANELS, False)
        self.panels: dict[str, tm.Panel] = {}
        self._rate_total = (0.0, 0)
        self._view_lost = 0

    def compose(self) -> ComposeResult:
        yield Static(id="status")
        yield DataTable(id="services", cursor_type="none", zebra_stripes=True)
        with Horizontal():
            yield DataTable(id="endpoints", cursor_type="none", zebra_stripes=True)
            yield DataTable(id="talkers", cursor_type="none", zebra_stripes=True)
        with Horizontal(id="bottom"):
            yield DataTable(id="dns", cursor_type="none", zebra_stripes=True)
            yield DataTable(id="lost", cursor_type="none", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.feed.start()
        self.set_interval(self.refresh_s, self.redraw)
        self.redraw()

    def on_unmount(self) -> None:
        self.feed.stop()

    # -- keys -----------------------------------------------------------------------------

    def _focused_panel(self) -> str:
        focused = self.focused
        return focused.id if isinstance(focused, DataTable) else "services"

    def action_sort(self) -> None:
        name = self._focused_panel()
        choices = tm.sort_choices(name)
        current = self.panels[name].sort if name in self.panels else choices[0]
        after = [c for c in choices if c > current]
        self.sort[name] = after[0] if after else choices[0]
        self.redraw(force=True)

    def action_reverse(self) -> None:
        name = self._focused_panel()
        self.reverse[name] = not self.reverse[name]
        self.redraw(force=True)

    def action_pause(self) -> None:
        self.paused = not self.paused
        self.redraw(force=True)

    def action_talkers(self) -> None:
        with self.lock:
            self.model.by_pair = not self.model.by_pair
        self.redraw(force=True)

    def action_focus(self, name: str) -> None:
        self.query_one(f"#{name}", DataTable).focus()

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        """A click on a header sorts by it; a second click reverses."""
        name = event.data_table.id
        if tm.COLUMNS[name][event.column_index].kind == "text" and event.column_index != 0:
            return
        if name in self.panels and self.panels[name].sort == event.column_index:
            self.reverse[name] = not self.reverse[name]
        else:
            self.sort[name], self.reverse[name] = event.column_index, False
        self.redraw(force=True)

    # -- drawing --------------------------------------------------------------------------

    def redraw(self, force: bool = False) -> None:
        now = self.clock()
        if not self.paused or force or not self.panels:
            with self.lock:
                self.panels = {name: self.model.panel(
                    name, now, sort=self.sort[name], reverse=self.reverse[name], limit=ROWS)
                    for name in tm.PANELS}
                rate = self.model.records_per_s(now)
                total = self.model.records
                self._view_lost = self.model.view_lost
            self._rate_total = (rate, total)
            for name, panel in self.panels.items():
                self._fill(self.query_one(f"#{name}", DataTable), panel)
        self.query_one("#status", Static).update(self.status_text())

    def status_text(self) -> Text:
        feed = self.feed
        rate, total = self._rate_total
        text = Text(f"collector {feed.address}  ")
        if feed.state == "connected":
            text.append("● connected", style="bold green")
        elif feed.state == "connecting":
            text.append("○ connecting", style="yellow")
        elif feed.state == "failed":
            text.append(f"✕ {feed.error}", style="bold red")
        else:
            text.append(f"✕ {feed.error}; retrying every {feed.retry_s:g} s", style="bold red")
        text.append(f"  {rate:,.1f} records/s  {total:,} records")
        if self._view_lost:
            text.append(f"  {self._view_lost:,} dropped for this view (it fell behind)",
                        style="bold yellow")
        if self.filters:
            text.append(f"  filter: {self.filters}")
        if self.paused:
            text.append("  PAUSED (p resumes)", style="reverse")
        return text

    def _fill(self, table: DataTable, panel: tm.Panel) -> None:
        """Update the table's cells in place: clearing it would reset scrolling."""
        arrow = "▲" if self.reverse[panel.name] else "▼"
        labels = [Text(c.name + (arrow if i == panel.sort else ""),
                       justify="left" if c.kind == "text" else "right")
                  for i, c in enumerate(panel.columns)]
        title = f"{panel.title} · {panel.keys:,} {'key' if panel.keys == 1 else 'keys'}"
        if panel.evicted:
            title += f" · {panel.evicted:,} evicted"
        table.border_title = title
        rows = [[Text(tm.format_cell(v, c.kind), justify="left" if c.kind == "text" else "right")
                 for v, c in zip(row, panel.columns)] for row in panel.rows]
        if [str(c.label) for c in table.ordered_columns] != [str(lb) for lb in labels]:
            table.clear(columns=True)
            table.add_columns(*labels)
            table.add_rows(rows)
            return
        for i, row in enumerate(rows):
            if i >= table.row_count:
                table.add_row(*row, key=str(i))
                continue
            for j, cell in enumerate(row):
                coord = Coordinate(i, j)
                if str(table.get_cell_at(coord)) != str(cell):
                    table.update_cell_at(coord, cell, update_width=True)
        for i in range(len(rows), table.row_count):
            table.remove_row(table.ordered_rows[len(rows)].key)


# -- command --------------------------------------------------------------------------------

def filter_text(args) -> str:
    """The filter flags given, as typed, for the status line."""
    parts = []
    for flag in cli.FILTER_FLAGS:
        for prefix in ("", "not-"):
            for value in getattr(args, (prefix + flag).replace("-", "_"), None) or ():
                parts.append(f"--{prefix}{flag} {value}")
    return " ".join(parts)


def subscribe_request(args):
    """tail's request for these filter flags, following live records only: rates are
    over arrival time, so replayed history would arrive as one burst."""
    ns = argparse.Namespace(**vars(args))
    ns.follow, ns.number, ns.since = True, 0, None
    return cli.build_subscribe_request(ns, time.time_ns())


def make_app(args, *, clock: Callable[[], int] = time.monotonic_ns,
             retry_s: float = RETRY_S, refresh_s: float = REFRESH_S) -> TopApp:
    """The app for parsed `loupe top` arguments. CollectorError (one line) when the
    collector does not answer."""
    from loupe.v1 import observer_pb2_grpc

    request = subscribe_request(args)
    tls = cli._tls(args)
    with open_channel(args.collector, tls) as channel:
        try:
            observer_pb2_grpc.ObserverStub(channel).Status(
                wire.observer_pb2.StatusRequest(), timeout=CONNECT_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise translate(exc, args.collector) from None
    feed = Feed(lambda: open_channel(args.collector, tls), request, tm.TopModel(), threading.Lock(), args.collector,
                clock=clock, retry_s=retry_s)
    return TopApp(feed, filters=filter_text(args), refresh_s=refresh_s, clock=clock)


def cmd_top(args) -> int:
    app = make_app(args)
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise ConfigError("loupe top draws on a terminal; for a stream to a pipe or file "
                          "use `loupe tail -f` with the same filter flags")
    app.run()
    return 0
