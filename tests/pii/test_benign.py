"""The benign WAF corpus (../shared/corpus/waf/, read at run time; not tuned on) through
`loupe replay --pii`: every count is checked against what samples.jsonl says the request
holds, with an oracle independent of sensor/l7/pii.py. The corpus is ordinary web traffic,
so it does carry PII: bearer JWTs, login forms (an email and a password), contact and
sign-up forms (emails, phone numbers), and two libinjection samples that are themselves an
address (ALL@MKSAT.NET, ORDER@ALLTHATSHEWANTS.US) and one that is a North American phone
number (909-527-9247). Those are correct detections, named here; anything else is a
false positive, and there must be none. No card, IBAN, SSN, address or API key is in the
corpus, so those counts must all be zero."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote_plus

import pytest

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "waf"
LOUPE = str(Path(sys.executable).with_name("loupe"))
# The libinjection benign samples that are themselves PII (their whole payload).
PII_PAYLOADS = {"ALL@MKSAT.NET": "email", "ORDER@ALLTHATSHEWANTS.US": "email",
                "909-527-9247": "phone"}
_ADDRESS = re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)*\.[a-z]{2,}\b", re.I)


def _expected(sample: dict) -> dict[str, int]:
    """What the request carries, read from the sample's own fields."""
    out: dict[str, int] = {}
    headers = {k.lower(): v for k, v in sample["headers"]}
    if headers.get("authorization", "").startswith("Bearer eyJ"):
        out["jwt.request"] = 1
    body = sample["body"]
    fields: dict = {}
    if body.startswith("{"):
        fields = json.loads(body)
    elif "=" in body:
        fields = dict(p.partition("=")[::2] for p in body.split("&"))
        fields = {k: unquote_plus(v) for k, v in fields.items()}
    emails = sum(1 for v in fields.values() if isinstance(v, str) and _ADDRESS.fullmatch(v))
    if emails:
        out["email.request"] = emails
    if any(k in ("phone", "mobile") and v for k, v in fields.items()):
        out["phone.request"] = 1
    if fields.get("password"):
        out["password.request"] = 1
    kind = PII_PAYLOADS.get(sample.get("payload", ""))
    if kind:
        out[f"{kind}.request"] = 1
    return out


@pytest.fixture(scope="module")
def replayed(tmp_path_factory):
    if not (CORPUS / "benign.pcap").is_file():
        pytest.fail(f"the WAF corpus is missing: {CORPUS}")
    out = tmp_path_factory.mktemp("benign") / "benign.jsonl"
    subprocess.run([LOUPE, "replay", "--pii", "--no-progress", str(CORPUS / "benign.pcap"),
                    "-o", str(out)], check=True, capture_output=True, timeout=300)
    return {r["src_port"]: r["detail"] for r in map(json.loads, filter(None, out.read_text().split("\n")))
            if r["type"] == "http"}


def test_benign_corpus_counts_only_the_pii_it_holds(replayed):
    # split("\n"), not splitlines(): sample bodies hold U+2028 and friends.
    lines = (CORPUS / "samples.jsonl").read_text().split("\n")
    samples = [s for s in map(json.loads, filter(None, lines)) if s["class"] == "benign"]
    assert len(replayed) == len(samples) == 605
    wrong = {}
    totals: dict[str, int] = {}
    for s in samples:
        got = dict(replayed[s["client_port"]]["pii"])
        for k, n in got.items():
            totals[k] = totals.get(k, 0) + n
        if got != _expected(s):
            wrong[s["id"]] = (got, _expected(s))
    assert not wrong, wrong
    # Nothing of the types the corpus does not hold.
    assert not {k for k in totals if k.split(".")[0] in ("card", "iban", "ssn", "ip", "secret")}
    assert totals["jwt.request"] > 100 and totals["email.request"] > 50   # the oracle bites
    # The retina asset name is not an address: logo@2x.png is counted nowhere.
    assert any("logo%402x.png" in d["path"] for d in replayed.values())
