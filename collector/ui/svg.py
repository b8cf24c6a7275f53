"""Charts and the service map as SVG, drawn on the server.

Charts are drawn here, by hand, because they are few and plain (lines over time cells,
horizontal bars): a charting library would bring a script to serve and run for what is
a hundred lines of SVG. Every chart is an `<svg role="img">` whose `<title>` and `<desc>`
say what it shows and its extremes in words, so a screen reader gets the figure without
the picture; each page also has the numbers as a table.

The service map is laid out by Graphviz `dot` (Debian's graphviz): layered drawing of a
directed graph is a solved problem we do not re-solve. Without `dot` the page says so
and keeps its edge table.
"""

from __future__ import annotations

import html
import logging
import re
import shutil
import subprocess
import time

log = logging.getLogger(__name__)

# Line styles: colour and dash together, so lines stay apart without colour vision.
STYLES = (("#1f5fa8", ""), ("#c0392b", "6 3"), ("#2e7d32", "2 3"), ("#7b3fa0", "8 3 2 3"))
W, H = 640, 200
PAD_L, PAD_R, PAD_T, PAD_B = 72, 12, 24, 28
# Edges drawn on the map: the busiest ones. dot's time grows faster than linearly; 300
# edges lay out in well under a second, and a map past that is unreadable anyway (the
# table below it keeps every edge).
MAX_MAP_EDGES = 300
DOT_TIMEOUT_S = 10.0


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def utc(ns: int) -> str:
    if not ns:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ns / 1e9))


def line_chart(chart_id: str, title: str, xs: list[int], series: list[tuple[str, list[float]]],
               unit: str, fmt=lambda v: f"{v:g}") -> str:
    """Lines over time: xs are cell start times (ns), each series one value per x."""
    values = [v for _, ys in series for v in ys]
    top = max(values, default=0.0) or 1.0
    plot_w, plot_h = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    n = len(xs)

    def x(i: int) -> float:
        return PAD_L + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)

    def y(v: float) -> float:
        return PAD_T + plot_h * (1 - v / top)

    summary = "; ".join(
        f"{name}: max {fmt(max(ys, default=0))} {unit}, last {fmt(ys[-1] if ys else 0)} {unit}"
        for name, ys in series)
    span = f"from {utc(xs[0])} to {utc(xs[-1])} UTC" if xs else "no data"
    out = [f'<svg class="chart" viewBox="0 0 {W} {H}" role="img" '
           f'aria-labelledby="{chart_id}-t {chart_id}-d" xmlns="http://www.w3.org/2000/svg">',
           f'<title id="{chart_id}-t">{_e(title)}</title>',
           f'<desc id="{chart_id}-d">{_e(f"{n} cells {span}. {summary}.")}</desc>',
           f'<line class="axis" x1="{PAD_L}" y1="{PAD_T + plot_h}" x2="{W - PAD_R}" '
           f'y2="{PAD_T + plot_h}"/>',
           f'<line class="axis" x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{PAD_T + plot_h}"/>',
           # The scale's top, with the unit above the axis where a long number fits.
           f'<text class="tick" x="{PAD_L - 4}" y="{PAD_T + 4}" text-anchor="end">'
           f'{_e(fmt(top))}</text>',
           f'<text class="tick" x="{PAD_L - 4}" y="{PAD_T - 10}" text-anchor="end">{_e(unit)}</text>',
           f'<text class="tick" x="{PAD_L - 4}" y="{PAD_T + plot_h}" text-anchor="end">0</text>']
    if xs:
        out.append(f'<text class="tick" x="{PAD_L}" y="{H - 8}">{_e(utc(xs[0]))}</text>')
        out.append(f'<text class="tick" x="{W - PAD_R}" y="{H - 8}" text-anchor="end">'
                   f'{_e(utc(xs[-1]))}</text>')
    for k, (name, ys) in enumerate(series):
        colour, dash = STYLES[k % len(STYLES)]
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(ys))
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        if not ys:
            pass
        elif len(ys) == 1:
            out.append(f'<circle cx="{x(0):.1f}" cy="{y(ys[0]):.1f}" r="3" fill="{colour}"/>')
        else:
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2"{dash_attr} '
                       f'points="{points}"/>')
        lx = PAD_L + 8 + k * 110
        out.append(f'<line x1="{lx}" y1="{PAD_T - 14}" x2="{lx + 18}" y2="{PAD_T - 14}" '
                   f'stroke="{colour}" stroke-width="2"{dash_attr}/>')
        out.append(f'<text class="legend" x="{lx + 22}" y="{PAD_T - 10}">{_e(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def bar_chart(chart_id: str, title: str, items: list[tuple[str, float]], unit: str) -> str:
    """Horizontal bars, largest first as given."""
    row = 22
    height = PAD_T + row * max(len(items), 1) + 8
    label_w, bar_w = 200, W - 200 - 80
    top = max((v for _, v in items), default=0) or 1
    desc = "; ".join(f"{label}: {value:g} {unit}" for label, value in items) or "no data"
    out = [f'<svg class="chart bars" viewBox="0 0 {W} {height}" role="img" '
           f'aria-labelledby="{chart_id}-t {chart_id}-d" xmlns="http://www.w3.org/2000/svg">',
           f'<title id="{chart_id}-t">{_e(title)}</title>',
           f'<desc id="{chart_id}-d">{_e(desc)}</desc>']
    for i, (label, value) in enumerate(items):
        y = PAD_T + i * row
        width = max(1.0, bar_w * value / top)
        out.append(f'<text class="tick" x="{label_w - 6}" y="{y + 14}" text-anchor="end">'
                   f'{_e(label)}</text>')
        out.append(f'<rect x="{label_w}" y="{y + 3}" width="{width:.1f}" height="{row - 8}" '
                   f'fill="{STYLES[0][0]}"/>')
        out.append(f'<text class="tick" x="{label_w + width + 4:.1f}" y="{y + 14}">'
                   f'{value:g}</text>')
    out.append("</svg>")
    return "".join(out)


def _dot_quote(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def map_dot(edges: list[dict], link) -> str:
    """The DOT text of a service map: one node per client or service, one edge per
    (protocol, client, service) with its requests and p50. `link(service)` is a node's
    URL (its endpoints), so a node is a keyboard-focusable link in the SVG."""
    nodes: dict[str, bool] = {}
    lines = ['digraph map {', 'graph [rankdir=LR, bgcolor="transparent", fontname="sans-serif",'
             ' nodesep=0.3, ranksep=0.9];',
             'node [shape=box, style="rounded,filled", fillcolor="#eef3fa", color="#1f5fa8",'
             ' fontname="sans-serif", fontsize=11];',
             'edge [color="#555555", fontname="sans-serif", fontsize=9];']
    for e in edges:
        nodes.setdefault(e["client"], False)
        nodes[e["service"]] = True
    for name, is_service in nodes.items():
        attrs = [f"label={_dot_quote(name)}", f"tooltip={_dot_quote(name)}"]
        if is_service:
            attrs.append(f"URL={_dot_quote(link(name))}")
        else:
            attrs.append('fillcolor="#f4f4f4", color="#777777"')
        lines.append(f"{_dot_quote(name)} [{', '.join(attrs)}];")
    for e in edges:
        p50 = f", p50 {e['p50_ns'] / 1e6:.3g} ms" if e.get("p50_ns") else ""
        err = f", {e['error_rate_5xx'] * 100:.3g}% 5xx" if e.get("error_rate_5xx") else ""
        label = f"{e['protocol']} · {e['requests']} req{p50}{err}"
        colour = ', color="#c0392b"' if e.get("error_rate_5xx") else ""
        lines.append(f"{_dot_quote(e['client'])} -> {_dot_quote(e['service'])} "
                     f"[label={_dot_quote(label)}, tooltip={_dot_quote(label)}{colour}];")
    lines.append("}")
    return "\n".join(lines)


class NoDot(Exception):
    """Graphviz `dot` is missing or failed: the reason, for the page."""


def service_map(edges: list[dict], link) -> str:
    """The map as inline SVG (no XML prolog), laid out by dot."""
    edges = sorted(edges, key=lambda e: -e["requests"])[:MAX_MAP_EDGES]
    dot = shutil.which("dot")
    if dot is None:
        raise NoDot("the map needs Graphviz `dot` (apt-get install graphviz); "
                    "the edges are listed below")
    try:
        done = subprocess.run([dot, "-Tsvg"], input=map_dot(edges, link).encode(),
                              capture_output=True, timeout=DOT_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise NoDot(f"dot did not lay out {len(edges)} edges within {DOT_TIMEOUT_S:g} s; "
                    "the edges are listed below") from None
    if done.returncode != 0:
        log.warning("dot failed: %s", done.stderr.decode(errors="replace").strip()[:300])
        raise NoDot("dot could not draw the map; the edges are listed below")
    svg = done.stdout.decode()
    svg = svg[svg.index("<svg"):]
    # dot's own <title> elements name nodes as "a->b"; the map's accessible name and
    # description come first, and the drawing is one image with links inside.
    desc = f"{len(edges)} edges between {len({e['client'] for e in edges} | {e['service'] for e in edges})} nodes"
    svg = re.sub(r"<svg ", '<svg role="img" aria-labelledby="map-t map-d" class="map" ', svg, count=1)
    svg = re.sub(r"(<svg[^>]*>)", r'\1<title id="map-t">Service map: clients and the '
                 r'services they call</title><desc id="map-d">' + _e(desc) + "</desc>",
                 svg, count=1)
    # Fixed pixel sizes from dot would overflow a narrow window: the viewBox scales.
    svg = re.sub(r'(<svg[^>]*?) width="[^"]*" height="[^"]*"', r"\1", svg, count=1)
    return svg
