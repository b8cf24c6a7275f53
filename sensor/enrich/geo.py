"""Geo and ASN of a flow's two ends, from MaxMind-format (MMDB) databases.

Where: in the sensor, on each Flow record as it leaves the flow table (live: beside
process attribution in sensor/engine/live.py; replay: in sensor/engine/pipeline.py), so
a replayed capture and a live sensor give the same records, a subscriber's stream carries
geo without a join, and the collector stores it as plain columns (src_country, src_city,
src_asn, dst_*). The cost is a lookup per flow end in the sensor; the cache below keeps
it to one per distinct address while the address stays hot.

What is read (the GeoIP2/GeoLite2 layouts, which DB-IP and IPinfo's MMDB files follow):
- country: `country.iso_code` (ISO 3166-1 alpha-2), else `registered_country.iso_code`
  (anycast and some provider blocks carry only the latter);
- city: `city.names.en`;
- ASN: `autonomous_system_number`, from the ASN database when one is given, else from the
  main database (a combined file carries both; GeoLite2 ships them as two files).

Addresses that are not global (RFC 6890 special-purpose: private, loopback, link-local,
shared 100.64.0.0/10, benchmarking 198.18.0.0/15, documentation, ULA fc00::/7, multicast)
are never looked up: they get no geo, whatever a database says.

The default database, when [geoip] is on and names none, is the GeoLite2 City file that
the maxminddb-geolite2 package ships (build of 2018-07-03; GeoLite2 data created by
MaxMind, CC BY-SA; docs/geo.md). It has no ASN data.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone

from sensor.errors import ConfigError
from sensor.model import Flow

log = logging.getLogger(__name__)

# Distinct addresses whose answer is kept. A flow end is looked up once per flow, and a
# sensor's flows repeat a small set of peers; 65,536 entries of (str, Place) are ~10 MiB.
# Overflow: the cache is emptied and refills (cheaper per lookup than LRU bookkeeping).
CACHE_SIZE = 65536

# A city or country name longer than this is cut: the column is free text from a file the
# user supplies.
NAME_MAX = 128


@dataclass(frozen=True, slots=True)
class Place:
    country: str = ""
    city: str = ""
    asn: int = 0


NOWHERE = Place()


def packaged_database() -> str:
    """The GeoLite2 City file maxminddb-geolite2 ships; ConfigError when not installed."""
    try:
        from _maxminddb_geolite2 import geolite2_database  # noqa: PLC0415
    except ImportError:
        raise ConfigError("[geoip] database is empty and the packaged GeoLite2 City database "
                          "is not installed: pip install maxminddb-geolite2, or set "
                          "[geoip] database to a .mmdb file") from None
    return geolite2_database()


def _open(path: str, what: str):
    import maxminddb  # noqa: PLC0415

    if not os.path.isfile(path):
        raise ConfigError(f"[geoip] {what} {path}: no such file: name a MaxMind-format "
                          "(.mmdb) database")
    try:
        return maxminddb.open_database(path)
    except (maxminddb.InvalidDatabaseError, ValueError, OSError) as exc:
        raise ConfigError(f"[geoip] {what} {path}: not a readable MaxMind DB file ({exc}); "
                          "name a .mmdb database") from None


def _name(record: dict, key: str) -> str:
    part = record.get(key)
    if not isinstance(part, dict):
        return ""
    names = part.get("names")
    value = names.get("en", "") if isinstance(names, dict) else ""
    return value[:NAME_MAX] if isinstance(value, str) else ""


def _country(record: dict) -> str:
    for key in ("country", "registered_country"):
        part = record.get(key)
        if isinstance(part, dict):
            code = part.get("iso_code")
            if isinstance(code, str) and code:
                return code[:8]
    return ""


def _asn(record: dict | None) -> int:
    if not isinstance(record, dict):
        return 0
    value = record.get("autonomous_system_number")
    return value if isinstance(value, int) and 0 < value < (1 << 32) else 0


class GeoEnricher:
    """open(), then lookup()/enrich() on one thread, then close()."""

    def __init__(self, main, asn=None, *, cache_size: int = CACHE_SIZE) -> None:
        self._main = main
        self._asn = asn
        self._cache: dict[str, Place] = {}
        self._cache_size = cache_size
        # Counters for metrics and tests: lookups done in the databases, answers served
        # from the cache, addresses skipped as not global, lookups with no answer.
        self.lookups = 0
        self.cached = 0
        self.not_global = 0
        self.unknown = 0

    @classmethod
    def open(cls, database: str = "", asn_database: str = "") -> "GeoEnricher":
        """database "" is the packaged GeoLite2 City file; asn_database "" is none (the
        ASN, if any, then comes from the main database). ConfigError in one line."""
        main = _open(database or packaged_database(), "database")
        asn = None
        if asn_database:
            try:
                asn = _open(asn_database, "asn_database")
            except ConfigError:
                main.close()
                raise
        for reader in (main, asn):
            if reader is not None:
                meta = reader.metadata()
                built = datetime.fromtimestamp(meta.build_epoch, timezone.utc)
                log.debug("geoip: %s, built %s", meta.database_type, built.date().isoformat())
        return cls(main, asn)

    def lookup(self, address: str) -> Place:
        hit = self._cache.get(address)
        if hit is not None:
            self.cached += 1
            return hit
        place = self._find(address)
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[address] = place
        return place

    def _find(self, address: str) -> Place:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return NOWHERE
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not ip.is_global or ip.is_multicast:
            self.not_global += 1
            return NOWHERE
        self.lookups += 1
        record = self._main.get(ip)
        place = NOWHERE
        if isinstance(record, dict):
            place = Place(_country(record), _name(record, "city"), _asn(record))
        if self._asn is not None:
            asn = _asn(self._asn.get(ip))
            if asn:
                place = dataclasses.replace(place, asn=asn)
        if place == NOWHERE:
            self.unknown += 1
            return NOWHERE
        return place

    def enrich(self, flow: Flow) -> Flow:
        src = self.lookup(flow.src_addr)
        dst = self.lookup(flow.dst_addr)
        if src is NOWHERE and dst is NOWHERE:
            return flow
        return dataclasses.replace(
            flow, src_country=src.country, src_city=src.city, src_asn=src.asn,
            dst_country=dst.country, dst_city=dst.city, dst_asn=dst.asn)

    def close(self) -> None:
        for reader in (self._main, self._asn):
            if reader is not None:
                reader.close()
        self._main = self._asn = None
