"""Cost of geo/ASN enrichment (sensor/enrich/geo.py) on the packaged GeoLite2 City file.

1. µs per lookup of a random public IPv4 address, uncached (a database read) and cached;
2. µs per Flow enriched from the cache (the frozen record rebuilt with its checks), and
   per Flow whose ends are both non-global (passed on untouched).

    python -m tests.benchmarks.bench_geo [--addresses 50000]
"""

from __future__ import annotations

import argparse
import random
import time

from sensor import model
from sensor.enrich.geo import GeoEnricher


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--addresses", type=int, default=50_000)
    args = ap.parse_args()
    rng = random.Random(1)
    addrs = [f"{rng.randint(1, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}."
             f"{rng.randint(1, 254)}" for _ in range(args.addresses)]
    geo = GeoEnricher.open()
    try:
        for label in ("uncached", "cached"):
            t = time.perf_counter()
            for a in addrs:
                geo.lookup(a)
            print(f"lookup {label}: {(time.perf_counter() - t) / len(addrs) * 1e6:.2f} µs")
        flow = model.Flow(uid="x", flow_start_ns=1, flow_end_ns=2, src_addr="198.18.0.1",
                          dst_addr="8.8.8.8", protocol=6, ip_version=4)
        local = model.Flow(uid="y", flow_start_ns=1, flow_end_ns=2, src_addr="198.18.0.1",
                           dst_addr="198.18.0.2", protocol=6, ip_version=4)
        for label, f in (("public end, cached", flow), ("both ends non-global", local)):
            t = time.perf_counter()
            for _ in range(len(addrs)):
                geo.enrich(f)
            print(f"enrich {label}: {(time.perf_counter() - t) / len(addrs) * 1e6:.2f} µs/flow")
    finally:
        geo.close()


if __name__ == "__main__":
    main()
