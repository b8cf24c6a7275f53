"""The console's drawings on their own: the service map's DOT text quotes any service
name, `dot` turns it into one named image with a link per service, and charts name
themselves and their extremes for screen readers, with or without data."""

from __future__ import annotations

import shutil

import pytest

from collector.ui import data, svg

EDGES = [
    {"protocol": "http", "client": '10.0.0.1', "service": 'we"ird\\name:80', "requests": 7,
     "p50_ns": 2_500_000, "error_rate_5xx": 0.5},
    {"protocol": "dns", "client": "10.0.0.1", "service": "10.0.0.53:53", "requests": 3,
     "p50_ns": 0, "error_rate_5xx": 0.0},
]


def test_map_dot_quotes_names_and_marks_errors():
    text = svg.map_dot(EDGES, lambda s: "/endpoints?q=" + s)
    assert '"we\\"ird\\\\name:80"' in text
    assert 'label="http · 7 req, p50 2.5 ms, 50% 5xx", tooltip=' in text
    assert 'color="#c0392b"' in text.split("->")[1]        # the 5xx edge is red
    assert 'label="dns · 3 req"' in text


@pytest.mark.skipif(shutil.which("dot") is None, reason="needs graphviz (scripts/apt-packages.txt)")
def test_service_map_is_one_named_image_with_links():
    out = svg.service_map(EDGES, lambda s: "/endpoints?q=x")
    assert out.startswith('<svg role="img" aria-labelledby="map-t map-d" class="map"')
    assert '<title id="map-t">Service map' in out and "2 edges between 3 nodes" in out
    assert out.count('href="/endpoints?q=x"') == 2           # one per service, not the client
    assert " width=" not in out.split(">", 1)[0]             # scales with the page


def test_charts_describe_themselves():
    chart = svg.line_chart("c", "Latency", [10**10, 2 * 10**10],
                           [("p50", [1.0, 3.0]), ("p99", [2.0, 9.0])], "ms")
    assert '<title id="c-t">Latency</title>' in chart
    assert "p50: max 3 ms, last 3 ms; p99: max 9 ms, last 9 ms" in chart
    assert "2 cells from 1970-01-01 00:00:10 to 1970-01-01 00:00:20 UTC" in chart
    empty = svg.line_chart("e", "Rate", [], [("req/s", [])], "req/s")
    assert "no data" in empty and "<polyline" not in empty
    bars = svg.bar_chart("b", "PII", [("card", 4), ("email", 2)], "occurrences")
    assert "card: 4 occurrences; email: 2 occurrences" in bars and bars.count("<rect") == 2


def test_search_words_and_globs():
    assert data.matches("", "a")
    assert data.matches("API users", "api.example:443", "GET", "/users/{id}")
    assert not data.matches("api orders", "api.example:443", "GET", "/users/{id}")
    assert data.matches("api.* get", "api.example:443", "GET", "/users/{id}")
    assert not data.matches("api.*x", "api.example:443", "GET", "/users/{id}")
