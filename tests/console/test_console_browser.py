"""The web console in a real browser: Debian's headless Chromium, driven through its
WebDriver (chromium-driver) by Selenium, against a real collector (DuckDB file in
tmp_path) fed by `loupe replay --collector` of real captures. One browser session walks
every page, checks that the replayed data is on it (a map edge, a known endpoint and its
charts, an alert, PII counts, a live-streamed record, countries and cities), the keyboard and screen-reader
basics (labels, landmarks, named charts, focus order), and saves a screenshot per page
in tmp_path (and in $LOUPE_CONSOLE_SHOTS when set, for people to look at)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest

REPO = Path(__file__).resolve().parents[2]
LOUPE = str(Path(sys.executable).with_name("loupe"))
GOLDEN = REPO / "tests" / "golden"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (scripts/apt-packages.txt)")

# Each page's accessibility basics, in the page: every form control has a label, every
# chart (svg role=img) a non-empty accessible name, images an alt, one main landmark and
# a named navigation. Returns what is wrong.
A11Y = """
const bad = [];
for (const el of document.querySelectorAll('input, select, textarea')) {
  if (el.type === 'hidden') continue;
  const label = el.id && document.querySelector('label[for="' + el.id + '"]');
  if (!label && !el.getAttribute('aria-label') && !el.getAttribute('aria-labelledby'))
    bad.push('unlabelled ' + el.outerHTML);
}
for (const svg of document.querySelectorAll('svg[role="img"]')) {
  const ids = (svg.getAttribute('aria-labelledby') || '').split(' ').filter(Boolean);
  const name = ids.map(i => (document.getElementById(i) || {}).textContent || '').join(' ');
  if (!name.trim()) bad.push('unnamed chart');
}
for (const img of document.querySelectorAll('img:not([alt])')) bad.push('img without alt');
if (document.querySelectorAll('main').length !== 1) bad.push('main landmarks != 1');
if (!document.querySelector('nav[aria-label]')) bad.push('no named nav');
if (!document.querySelector('h1')) bad.push('no h1');
return bad;
"""


def loupe(*args) -> str:
    out = subprocess.run([LOUPE, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (args, out.stderr)
    return out.stdout


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # --no-sandbox: the tests run as root, where Chromium's sandbox refuses to start.
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _shot(driver, directory: Path, name: str) -> Path:
    """The whole page: the window is made as tall as the document (bounded)."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, max(700, min(int(height) + 120, 4000)))
    path = directory / f"{name}.png"
    assert driver.save_screenshot(str(path)), name
    driver.set_window_size(1280, 900)
    extra = os.environ.get("LOUPE_CONSOLE_SHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / path.name)
    return path


def _wait(predicate, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_every_page_shows_the_replayed_data(start_collector, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from tests.geo.test_geo import _capture as geo_capture
    from tests.pii.planted import write_capture

    running = start_collector(ui_listen="127.0.0.1:0")
    base = running.collector.ui.url.rstrip("/")
    planted = tmp_path / "planted.pcap"
    write_capture(planted)
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nid = "console-curl"\naction = "alert"\n'
                     'field = "header:user-agent"\nop = "contains"\nvalue = "golden-curl"\n')
    loupe("replay", planted, GOLDEN / "curl-http.pcap", "--rules", rules, "--pii",
          "--collector", running.address, "--no-progress")
    shots = tmp_path / "shots"
    shots.mkdir()
    d = browser

    def page(path: str, name: str) -> str:
        d.get(base + path)
        assert d.execute_script(A11Y) == [], name
        _shot(d, shots, name)
        return d.find_element(By.TAG_NAME, "main").text

    # Service map: the capture's client -> server edge, drawn and listed.
    text = page("/map", "map")
    graph = d.find_element(By.CSS_SELECTOR, "svg.map").get_attribute("textContent")
    assert "198.18.7.1" in graph and "198.18.7.2:80" in graph and "http · 2 req" in graph
    assert "http 198.18.7.1 198.18.7.2:80 2" in text

    # Focus order from the top: the skip link, then the pages in the order shown; the
    # keyboard follows a link.
    d.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    assert d.switch_to.active_element.text == "Skip to content"
    names = []
    for _ in range(6):
        d.switch_to.active_element.send_keys(Keys.TAB)
        names.append(d.switch_to.active_element.text)
    assert names == ["Service map", "Endpoints", "Alerts", "Live records", "PII", "Geo"]
    for _ in range(4):   # back from Geo to Endpoints
        d.switch_to.active_element.send_keys(Keys.SHIFT, Keys.TAB)
    assert d.switch_to.active_element.text == "Endpoints"
    d.switch_to.active_element.send_keys(Keys.ENTER)
    _wait(lambda: d.current_url.endswith("/endpoints"), "the endpoints page")

    # Endpoint inventory with search, then one endpoint's charts.
    text = page("/endpoints?q=" + quote("198.18.7.2 index"), "endpoints")
    assert "198.18.7.2:80 GET /index.html 1 2xx:1" in text and "/b.txt" not in text
    assert "1 of" in text
    d.find_element(By.LINK_TEXT, "/index.html").send_keys(Keys.ENTER)
    _wait(lambda: "/endpoint?" in d.current_url, "the endpoint page")
    assert d.execute_script(A11Y) == []
    titles = [e.get_attribute("textContent") for e in d.find_elements(By.CSS_SELECTOR, "svg.chart title")]
    assert titles == ["Request rate of GET /index.html", "Errors of GET /index.html",
                      "Latency of GET /index.html"]
    latency = d.find_element(By.ID, "c-lat-d").get_attribute("textContent")
    assert "p50: max 6.6" in latency, latency      # the capture's 6.636 ms, within 1 %
    assert "text/html" in d.find_element(By.TAG_NAME, "main").text
    _shot(d, shots, "endpoint")

    # Alerts: the rule that matched curl's user agent, per rule and listed.
    text = page("/alerts", "alerts")
    assert "console-curl alert 2" in text
    assert text.count("198.18.7.1:") == 2

    # PII: counts per type on the planted endpoints, never a value.
    text = page("/pii", "pii")
    for kind in ("email", "card", "iban", "ssn", "jwt", "password"):
        assert f" {kind} " in text, kind
    assert "4111111111111111" not in d.page_source and "alice.planted" not in d.page_source
    assert d.find_element(By.CSS_SELECTOR, "svg.bars title").get_attribute("textContent")

    # Geo before any geo data: the page says what to set.
    text = page("/geo", "geo-none")
    assert "no geo data: set [geoip]" in text

    # A filter `loupe tail` refuses is refused in one line, and no stream starts.
    text = page("/stream?filter=" + quote("--http-status abc"), "stream-bad-filter")
    assert "is not an HTTP status filter" in text and not d.find_elements(By.ID, "records")

    # Live records with tail filters: flows to the two US servers. Nothing stored
    # matches; the geo tests' capture (public addresses, one pair private) replayed with
    # the packaged GeoLite2 City file while the page is open streams in, and nothing
    # else does.
    d.get(base + "/stream?filter=" + quote("--type flow --to-ip 8.8.8.8 "
                                           "--to-ip 2001:4860:4860::8888"))
    _wait(lambda: "Connected" in d.find_element(By.ID, "stream-status").text, "the stream")
    assert d.execute_script(A11Y) == []
    geo_pcap = tmp_path / "geo.pcap"
    geo_capture(geo_pcap)
    loupe("replay", geo_pcap, "--geoip", "default", "--collector", running.address,
          "--sensor-id", "live", "--no-progress")
    us = ("8.8.8.8", "2001:4860:4860::8888")
    _wait(lambda: {a for a in us for e in d.find_elements(By.CSS_SELECTOR, "#records li")
                   if a in e.text} == set(us), "streamed flows to both US addresses")
    lines = [e.text for e in d.find_elements(By.CSS_SELECTOR, "#records li")]
    assert all(" live " in line and any(a in line for a in us) for line in lines), lines
    assert {e.get_attribute("class")
            for e in d.find_elements(By.CSS_SELECTOR, "#records li")} == {"rec rec-flow"}
    _shot(d, shots, "stream")

    # Geo with data: countries and cities of either end, from the stored flows.
    text = page("/geo", "geo")
    assert "US 2" in text and "AU 1" in text, text
    assert "US Mountain View 1" in text and "AU Research 1" in text
    assert "US: 2 flows" in d.find_element(By.ID, "geo-countries-d").get_attribute("textContent")
    assert sorted(p.name for p in shots.iterdir()) == [
        "alerts.png", "endpoint.png", "endpoints.png", "geo-none.png", "geo.png", "map.png",
        "pii.png", "stream-bad-filter.png", "stream.png"]
