"""Events and raw requests for rules tests."""

from __future__ import annotations

from pathlib import Path

from sensor.model import HttpEvent, L7Event
from sensor.rules import engine, loader

BASE = 1_717_200_000_000_000_000


def request(method: str = "GET", target: str = "/", headers: dict | None = None,
            body: bytes = b"") -> tuple[bytes, bytes]:
    hs = {"Host": "shop.example.test", "User-Agent": "Mozilla/5.0", **(headers or {})}
    if body and "Content-Length" not in hs:
        hs["Content-Length"] = str(len(body))
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hs.items())
    return head.encode(), body


def event(i: int = 1, *, method: str = "GET", path: str = "/", status: int = 200,
          src: str = "198.18.5.1", ts_ns: int | None = None) -> L7Event:
    return L7Event(uid=f"C{i}", community_id=f"1:cid{i}=", ts_ns=BASE + i * 10**6
                   if ts_ns is None else ts_ns, src_addr=src, dst_addr="198.18.5.2",
                   src_port=40000 + i % 20000, dst_port=80, protocol=6,
                   detail=HttpEvent(method=method, host="shop.example.test", path=path,
                                    version="HTTP/1.1", status=status))


def rules(tmp_path: Path, text: str, name: str = "r.toml") -> engine.RuleSet:
    f = tmp_path / name
    f.write_text(text)
    return loader.load(f)
