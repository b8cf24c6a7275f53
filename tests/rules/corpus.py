"""The WAF evaluation corpus (../shared/corpus/waf): where it is and how to split it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "waf"
CLASSES = ("sqli", "xss", "lfi", "rce", "scanner", "benign")


def samples() -> list[dict]:
    with open(CORPUS / "samples.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def held_out(sample: dict) -> bool:
    """About a third of the samples, chosen by a hash of the id: never looked at while the
    detectors were written; the figures on them show how the detectors generalise."""
    return hashlib.sha256(sample["id"].encode()).digest()[0] < 86


def raw_request(s: dict) -> tuple[bytes, bytes]:
    head = f"{s['method']} {s['uri']} {s['version']}\r\n" + "".join(
        f"{n}: {v}\r\n" for n, v in s["headers"])
    return head.encode(), s["body"].encode()


def label(s: dict) -> str:
    if s["class"] == "benign":
        return "benign-adv" if s["source"] == "libinjection" else "benign"
    return s["class"]
