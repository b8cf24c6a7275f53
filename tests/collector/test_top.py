"""`loupe top` through textual's headless driver (App.run_test + Pilot), fed by a real
collector that receives the golden captures from a real `loupe replay --to`."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

from textual.widgets import DataTable

from collector import top, top_model as tm
from collector.client import open_channel
from sensor import cli as loupe_cli
from sensor.export import wire
from tests.collector.conftest import REPO, batch, mixed, observer_stub, push

LOUPE = [sys.executable, "-m", "sensor.cli"]
PCAPS = sorted(str(p) for p in (REPO / "tests" / "golden").glob("*.pcap"))
GOLDEN_RECORDS = 31  # what replaying PCAPS yields (tests/golden/*.jsonl)
SIZE = (180, 48)


def top_args(address: str, *flags: str):
    return loupe_cli.build_parser(["collector.cli"]).parse_args(
        ["top", "--collector", address, *flags])


def subscribers(address: str) -> int:
    return observer_stub(address).Status(wire.observer_pb2.StatusRequest(), timeout=5).subscribers


async def until(pilot, predicate, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await pilot.pause(0.05)


async def replay(address: str, sensor_id: str = "replay") -> None:
    # The collector drops a batch it has stored, by (sensor id, batch id): a second
    # replay of the same files needs a sensor id of its own.
    proc = await asyncio.create_subprocess_exec(
        *LOUPE, "replay", *PCAPS, "--to", address, "--sensor-id", sensor_id,
        "--no-progress", cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()


async def click_header(pilot, app, panel: str, index: int) -> None:
    table = app.query_one(f"#{panel}", DataTable)
    x = 1 + sum(c.get_render_width(table) for c in table.ordered_columns[:index])
    await pilot.click(table, offset=(x + 1, 1))  # inside the border, on the header row


async def redrawn(pilot, app) -> None:
    """The tables as of the model now (the timer's redraw may lag a record behind)."""
    app.redraw(force=True)
    await pilot.pause()


def column(app, panel: str, index: int = 0) -> list[str]:
    table = app.query_one(f"#{panel}", DataTable)
    return [str(table.get_row_at(i)[index]) for i in range(table.row_count)]


def labels(app, panel: str) -> list[str]:
    return [str(c.label) for c in app.query_one(f"#{panel}", DataTable).ordered_columns]


async def connected(pilot, app, address: str, count: int = 1) -> None:
    # The feed is connected once the collector counts its subscription: records pushed
    # from then on reach it.
    await until(pilot, lambda: app.feed.state == "connected" and subscribers(address) >= count,
                "the feed's subscription")


def test_top_shows_the_golden_traffic_sorts_pauses_and_saves_a_capture(collector, tmp_path):
    async def scenario():
        app = top.make_app(top_args(collector.address), refresh_s=0.2)
        async with app.run_test(size=SIZE) as pilot:
            await connected(pilot, app, collector.address)
            await replay(collector.address)
            await until(pilot, lambda: app.model.records >= GOLDEN_RECORDS, "the records")
            await redrawn(pilot, app)
            assert app.model.records == GOLDEN_RECORDS

            services = dict(zip(column(app, "services"), column(app, "services", 2)))
            assert services["198.18.0.2:53"] == "4" and services["tls.golden.test"] == "2"
            assert services["golden.test"] == "2" and services["198.18.7.2"] == "2"
            assert column(app, "dns", 1) == ["NXDOMAIN"]
            assert sorted(column(app, "lost")) == ["parser_error", "reassembly_gap"]
            assert column(app, "talkers")[0] == "198.18.7.1 → 198.18.7.2"
            # Slowest first: p95 is the sort column until a key says otherwise.
            assert column(app, "endpoints")[0] == "GET 198.18.7.2/index.html"
            assert labels(app, "endpoints")[4] == "p95▼"

            # `3` picks the endpoints panel, `s` moves its sort to max, then status.
            await pilot.press("3", "s", "s")
            assert labels(app, "endpoints")[6] == "status▼"
            assert column(app, "endpoints")[0] == "POST golden.test/b"  # 201
            # A click on a header sorts by that column; a second click reverses.
            await click_header(pilot, app, "services", 8)
            assert labels(app, "services")[8] == "p95▼"
            assert column(app, "services")[0] == "198.18.0.2:53"  # 13 ms
            await click_header(pilot, app, "services", 8)
            assert labels(app, "services")[8] == "p95▲"
            assert column(app, "services")[0] == "198.18.7.2:53"  # 2.5 ms, the fastest
            # `2` picks the talkers, `r` reverses them, `t` counts by address.
            before = column(app, "talkers")
            await pilot.press("2", "r")
            assert column(app, "talkers") == before[::-1]
            await pilot.press("t")
            assert "198.18.7.2" in column(app, "talkers")
            assert "by address" in app.query_one("#talkers", DataTable).border_title

            # Paused, the panels stand still while the feed keeps counting.
            await pilot.press("p")
            frozen = column(app, "services", 2)
            await replay(collector.address, "again")
            await until(pilot, lambda: app.model.records >= 2 * GOLDEN_RECORDS, "more records")
            await pilot.pause(0.5)
            assert column(app, "services", 2) == frozen
            assert "PAUSED" in str(app.query_one("#status").render())
            await pilot.press("p")
            assert dict(zip(column(app, "services"), column(app, "services", 2)))[
                "198.18.0.2:53"] == "8"

            status = str(app.query_one("#status").render())
            assert f"collector {collector.address}" in status and "connected" in status
            text = top.screen_text(app)
            (tmp_path / "top.txt").write_text(text + "\n")
            (tmp_path / "top.svg").write_text(app.export_screenshot())
            await pilot.press("q")
            assert not app.is_running
        return text

    text = asyncio.run(scenario())
    lines = text.splitlines()
    assert len(lines) == SIZE[1] and max(map(len, lines)) <= SIZE[0]
    for shown in ("Services", "Slowest endpoints", "Top talkers by address", "DNS errors",
                  "Lost events", "missing.golden.test", "POST golden.test/b", "NXDOMAIN",
                  "parser_error", f"collector {collector.address}"):
        assert shown in text, shown
    assert (tmp_path / "top.svg").read_text().startswith("<svg")


def test_top_filters_like_tail(collector):
    async def scenario():
        app = top.make_app(top_args(collector.address, "--to-port", "443"), refresh_s=0.2)
        async with app.run_test(size=SIZE) as pilot:
            await connected(pilot, app, collector.address)
            await replay(collector.address)
            # 3 TLS events and their 3 flows pass; everything else is filtered out.
            await until(pilot, lambda: app.model.records >= 6, "the TLS records")
            await pilot.pause(0.5)  # time for a record that should not pass to arrive
            await redrawn(pilot, app)
            assert app.model.records == 6
            assert sorted(column(app, "services")) == ["split.golden.test", "tls.golden.test"]
            assert sorted(column(app, "talkers")) == ["198.18.7.1 → 198.18.7.2", "fc00::1 → fc00::2"]
            assert column(app, "dns") == [] and column(app, "endpoints") == []
            assert "filter: --to-port 443" in str(app.query_one("#status").render())

    asyncio.run(scenario())


def test_top_says_when_the_collector_goes_and_reconnects(start_collector, tmp_path):
    first = start_collector()
    port = first.port

    async def scenario():
        app = top.make_app(top_args(first.address), refresh_s=0.1, retry_s=0.2)
        async with app.run_test(size=SIZE) as pilot:
            await connected(pilot, app, first.address)
            await asyncio.to_thread(first.stop)
            await until(pilot, lambda: "retrying" in str(app.query_one("#status").render()),
                        "the status line to say the collector went")
            status = str(app.query_one("#status").render())
            assert "cannot reach the collector" in status or "ended the stream" in status
            second = start_collector(listen=f"127.0.0.1:{port}", data_dir=tmp_path / "data2")
            await connected(pilot, app, second.address)
            assert app.feed.connects == 2
            await replay(second.address)
            await until(pilot, lambda: app.model.records >= GOLDEN_RECORDS, "records again")
            await pilot.press("ctrl+c")
            assert not app.is_running  # Ctrl-C quits, as in top

    asyncio.run(scenario())


def test_records_dropped_for_a_slow_view_are_counted_and_shown(start_collector):
    # A queue of 8 records per subscriber: each 1000-record batch overflows it at once.
    running = start_collector(subscriber_queue=8)
    records = mixed(5000)

    async def scenario():
        app = top.make_app(top_args(running.address), refresh_s=0.1)
        async with app.run_test(size=SIZE) as pilot:
            await connected(pilot, app, running.address)
            await asyncio.to_thread(push, running.address, [
                batch(records[i:i + 1000], i // 1000 + 1) for i in range(0, 5000, 1000)])

            def seen():
                # Records the view got, plus those the collector said it dropped for it.
                with app.lock:
                    return app.model.records - app.model.tables["lost"].entries[
                        ("subscriber_slow", "")].records + app.model.view_lost

            await until(pilot, lambda: app.model.view_lost and seen() == 5000,
                        "every record seen or reported lost")
            await redrawn(pilot, app)
            assert app.model.view_lost > 3000
            status = str(app.query_one("#status").render())
            assert f"{app.model.view_lost:,} dropped for this view" in status
            assert "subscriber_slow" in column(app, "lost")
            await pilot.press("q")

    asyncio.run(scenario())


def test_a_refused_subscription_is_not_retried(collector):
    # A status range the client would not send; the collector refuses it
    # (INVALID_ARGUMENT), and asking again every 2 s would only repeat that.
    request = wire.observer_pb2.SubscribeRequest(
        follow=True, allow=[wire.observer_pb2.RecordFilter(http_status=["9x9"])])
    feed = top.Feed(lambda: open_channel(collector.address), request, tm.TopModel(),
                    threading.Lock(), collector.address, retry_s=0.05)
    feed.start()
    try:
        deadline = time.monotonic() + 20
        while feed.state != "failed" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert feed.state == "failed", (feed.state, feed.error)
        assert "refused the request" in feed.error and feed.connects == 1
        time.sleep(0.3)
        assert feed.connects == 1
    finally:
        feed.stop()


def test_unreachable_collector_is_one_line(tmp_path):
    from tests.export.collector_proc import free_port

    proc = subprocess.run([*LOUPE, "top", "--collector", f"127.0.0.1:{free_port()}"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "cannot reach the collector" in proc.stderr


def test_top_needs_a_terminal(collector):
    proc = subprocess.run([*LOUPE, "top", "--collector", collector.address], cwd=REPO,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and "loupe tail -f" in proc.stderr
    assert proc.stderr.count("\n") == 1
