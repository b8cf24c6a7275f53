"""The console's HTTP server: aiohttp on the collector's own event loop, pages rendered
with Jinja2 from what collector/ui/data.py reads, and a live record stream as
Server-Sent Events.

Access is the gRPC API's. With mTLS the console is HTTPS with the collector's own
certificate, and every request, the style sheet included, must come with a client
certificate from the same CA whose role may read records (collector/roles.py: the
Observer's analyst or admin). The certificate is asked for but not required in the TLS
handshake, so a browser without one gets a page saying what is missing instead of a
bare handshake failure. Without mTLS (a loopback or --insecure collector) everything is
open, as the gRPC API is.

Reads that block (locks, queue flushes, DuckDB) run on one reader thread of the
console's: the event loop keeps carrying ingest, and one analyst clicking around cannot
occupy more than that thread.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import ssl
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlencode

import jinja2
from aiohttp import web

from collector import cli as ccli
from collector import filters, render, roles
from collector.server import split_address
from collector.stats.model import RES_INDEX
from collector.ui import data, svg
from sensor.errors import CollectorError, ConfigError, LoupeError
from sensor.export import wire

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
# The gRPC service whose roles the console shares: it shows stored and live records.
SERVICE = "loupe.v1.Observer"
# Stored records a live stream page starts with (then live ones follow).
STREAM_LAST = 100
# A stream with nothing to send writes an SSE comment this often, so a closed browser
# tab is noticed (the write fails) and its hub subscription ends.
KEEPALIVE_S = 15.0
# Seconds open requests get at stop; live streams are cancelled before it.
SHUTDOWN_S = 1.0

PAGES = (("map", "/map", "Service map"), ("endpoints", "/endpoints", "Endpoints"),
         ("alerts", "/alerts", "Alerts"), ("stream", "/stream", "Live records"),
         ("pii", "/pii", "PII"), ("geo", "/geo", "Geo"))


class _FilterParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ConfigError(f"filter: {message} (use the flags of `loupe tail`, e.g. "
                          "--http-status 500+ --to-port 443)")


def _filter_parser() -> argparse.ArgumentParser:
    parser = _FilterParser(prog="filter", add_help=False)
    ccli.add_filter_flags(parser)
    return parser


def compile_filter(text: str):
    """`loupe tail` filter flags as one text ("--http-status 500+ --not-port 53") ->
    the predicate the Observer's Subscribe would use."""
    try:
        argv = shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"filter: {exc}") from None
    args = _filter_parser().parse_args(argv)
    return filters.compile_lists(*ccli.filter_lists(args))


def _ms(ns) -> str:
    return f"{ns / 1e6:.3g} ms" if ns else "-"


def _pct(x) -> str:
    return f"{x * 100:.3g} %" if x else "0"


class Console:
    """The console of one Collector (collector/server.py): start() binds and serves,
    stop() ends live streams and closes."""

    def __init__(self, collector) -> None:
        self.collector = collector
        config = collector.config
        self.listen = config.ui_listen
        self.host, self.port = split_address(config.ui_listen)
        self.mtls = config.mtls
        self.ssl = self._ssl_context(config) if config.mtls else None
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
            undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self.env.filters.update(utc=svg.utc, ms=_ms, pct=_pct)
        self.app = web.Application(middlewares=[self._guard])
        self.app.on_response_prepare.append(self._headers)
        self.app.add_routes([
            web.get("/", self._root), web.get("/map", self.page_map),
            web.get("/endpoints", self.page_endpoints), web.get("/endpoint", self.page_endpoint),
            web.get("/alerts", self.page_alerts), web.get("/stream", self.page_stream),
            web.get("/stream/events", self.stream_events), web.get("/pii", self.page_pii),
            web.get("/geo", self.page_geo), web.static("/static", HERE / "static"),
        ])
        self.runner: web.AppRunner | None = None
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="loupe-console")
        self._streams: set[asyncio.Task] = set()

    @staticmethod
    def _ssl_context(config) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(config.tls_cert, config.tls_key)
            ctx.load_verify_locations(cafile=str(config.tls_ca))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"the console cannot use the collector's TLS files: {exc}") from None
        # Asked for, checked against the CA when given, refused with a page when absent.
        ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.mtls else 'http'}://{host}:{self.port}/"

    async def start(self) -> None:
        self.runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=SHUTDOWN_S)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, ssl_context=self.ssl,
                           reuse_port=False)
        try:
            await site.start()
        except OSError as exc:
            await self.runner.cleanup()
            self.runner = None
            raise CollectorError(
                f"cannot serve the console on {self.listen}: "
                f"{os.strerror(exc.errno).lower() if exc.errno else exc}; stop the "
                "other process or choose another --ui HOST:PORT") from None
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        for task in list(self._streams):
            task.cancel()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        self._reader.shutdown(wait=True, cancel_futures=True)

    # -- access ----------------------------------------------------------------------

    def refusal(self, request: web.Request) -> str | None:
        """Why this request may not read, or None (roles.refusal on the peer's cert)."""
        if not self.mtls:
            return None
        tls = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = tls.getpeercert(binary_form=True) if tls is not None else None
        auth = {"x509_pem_cert": [ssl.DER_cert_to_PEM_cert(der).encode()]} if der else {}
        return roles.refusal(SERVICE, auth)

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        reason = self.refusal(request)
        if reason is not None:
            return self._page("error.html", "", status=403, title="Not allowed", reason=reason,
                              hint="The console needs a client certificate with the analyst or "
                                   "admin role, from the collector's CA (`loupe certs init "
                                   "--analyst NAME`), imported into this browser.")
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except LoupeError as exc:
            log.warning("console: %s: %s", request.path, exc)
            return self._page("error.html", "", status=503, title="Cannot show this page",
                              reason=str(exc), hint="")

    @staticmethod
    async def _headers(request: web.Request, response: web.StreamResponse) -> None:
        # Everything comes from this server; nothing may frame it (clickjacking).
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self'; "
            "script-src 'self'; frame-ancestors 'none'")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"

    # -- rendering -------------------------------------------------------------------

    def _page(self, template: str, current: str, status: int = 200, **context) -> web.Response:
        text = self.env.get_template(template).render(pages=PAGES, current=current, **context)
        return web.Response(text=text, content_type="text/html", status=status)

    async def _read(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._reader, fn, *args)

    async def _root(self, request: web.Request):
        raise web.HTTPFound("/map")

    async def page_map(self, request: web.Request):
        resolution = request.query.get("resolution", "1h")
        if resolution not in RES_INDEX:
            resolution = "1h"
        got = await self._read(data.service_map, self.collector, resolution)
        drawing, why = "", ""
        if got["edges"]:
            try:
                drawing = await self._read(
                    svg.service_map, got["edges"],
                    lambda service: "/endpoints?" + urlencode({"q": service}))
            except svg.NoDot as exc:
                why = str(exc)
        return self._page("map.html", "map", resolution=resolution, resolutions=list(RES_INDEX),
                          drawing=drawing, why=why, **got)

    async def page_endpoints(self, request: web.Request):
        query = request.query.get("q", "").strip()
        got = await self._read(data.endpoints, self.collector, query)
        return self._page("endpoints.html", "endpoints", q=query, **got)

    async def page_endpoint(self, request: web.Request):
        q = request.query
        service, method, path = q.get("service", ""), q.get("method", ""), q.get("path", "")
        got = await self._read(data.endpoint, self.collector, service, method, path,
                               q.get("resolution", ""))
        if got is None:
            return self._page("error.html", "endpoints", status=404, title="No such endpoint",
                              reason=f"{method} {service}{path} is not in the inventory",
                              hint="Pick one from the endpoint list.")
        cells, xs = got["cells"], got["xs"]
        chart_id = "c"
        charts = [
            svg.line_chart(f"{chart_id}-rate", f"Request rate of {method} {path}", xs,
                           [("requests/s", [c["rate"] for c in cells])], "req/s",
                           fmt=lambda v: f"{v:.3g}"),
            svg.line_chart(f"{chart_id}-err", f"Errors of {method} {path}", xs,
                           [("4xx", [c["errors_4xx"] for c in cells]),
                            ("5xx", [c["errors_5xx"] for c in cells])], "responses",
                           fmt=lambda v: f"{v:.3g}"),
            svg.line_chart(f"{chart_id}-lat", f"Latency of {method} {path}", xs,
                           [(p, [c[f"{p}_ns"] / 1e6 for c in cells]) for p in ("p50", "p90", "p99")],
                           "ms", fmt=lambda v: f"{v:.3g}"),
        ]
        base = {"service": service, "method": method, "path": path}
        links = {r: "/endpoint?" + urlencode({**base, "resolution": r}) for r in RES_INDEX}
        return self._page("endpoint.html", "endpoints", charts=charts, links=links,
                          rows=list(zip(xs, cells)), **got)

    async def page_alerts(self, request: web.Request):
        rule = request.query.get("rule", "").strip()
        got = await self._read(data.alerts, self.collector, rule)
        return self._page("alerts.html", "alerts", rule=rule, **got)

    async def page_pii(self, request: web.Request):
        query = request.query.get("q", "").strip()
        got = await self._read(data.pii_rows, self.collector, query)
        chart = svg.bar_chart("pii-totals", "PII occurrences per type", got["totals"],
                              "occurrences") if got["totals"] else ""
        return self._page("pii.html", "pii", q=query, chart=chart, **got)

    async def page_geo(self, request: web.Request):
        got = await self._read(data.geo, self.collector)
        chart = ""
        if not got["missing"]:
            chart = svg.bar_chart("geo-countries", "Flows per country (either end)",
                                  [(c["key"], c["flows"]) for c in got["countries"][:20]], "flows")
        return self._page("geo.html", "geo", chart=chart, **got)

    async def page_stream(self, request: web.Request):
        text = request.query.get("filter", "").strip()
        error = ""
        try:
            compile_filter(text)
        except ConfigError as exc:
            error = str(exc)
        events = "" if error else "/stream/events?" + urlencode({"filter": text})
        return self._page("stream.html", "stream", filter=text, error=error, events=events,
                          last=STREAM_LAST)

    # -- the live stream ---------------------------------------------------------------

    async def stream_events(self, request: web.Request):
        """Server-Sent Events: the newest STREAM_LAST stored records that pass the
        filter, then live ones, as `loupe tail --last N -f` would give them. One hub
        subscriber per open page: a slow browser loses records (a LostEvent line says
        how many), never holds up ingest."""
        try:
            match = compile_filter(request.query.get("filter", ""))
        except ConfigError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        hub = self.collector.hub
        try:
            sub = hub.add(match)
        except ConfigError as exc:   # too many subscribers
            raise web.HTTPServiceUnavailable(text=str(exc)) from None
        task = asyncio.current_task()
        self._streams.add(task)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)
            # The same history-then-live stitching as Subscribe (no gap, no duplicate).
            stored = self.collector.observer.stored(match, sub.start_seq, last=STREAM_LAST)
            async for rec in stored:
                await response.write(_event(rec))
            while True:
                try:
                    rec = await asyncio.wait_for(sub.next(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    await response.write(b": keepalive\n\n")
                    continue
                await response.write(_event(rec))
        except (ConnectionResetError, ConnectionError):
            pass   # the page was closed
        finally:
            hub.remove(sub)
            self._streams.discard(task)
        return response


def _event(rec) -> bytes:
    """One record as an SSE message: its kind and its `loupe tail` table line."""
    line = render.line(wire.from_proto(rec))
    payload = json.dumps({"kind": filters.kind_of(rec), "line": line})
    return f"data: {payload}\n\n".encode()
