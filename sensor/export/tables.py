"""The tabular shape of Loupe records: one table per record kind, one column per model field.

Shared by the file sinks (Parquet, CSV), replay's DataFrames and the collector's storage
(collector/schema.py adds its own two columns), so a replayed capture and a collector
export load into the same queries. The columns follow sensor/model.py field for field.
Nested values are flattened into prefixed columns (Flow.l7_coverage -> l7_coverage_*,
Flow.process -> process_*), lists stay lists (LIST(STRUCT) for a tuple of dataclasses,
LIST(VARCHAR) for a tuple of strings) and Flow.l7_summary is a MAP (l7_summary['mysql_user']),
so SQL needs no JSON functions.

L7 tables come from the protocol registry (sensor/l7/registry.py): the envelope columns
every L7 event shares, then the event dataclass's fields with the storage types its
registration names (an int is UBIGINT unless it says otherwise).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

import pyarrow as pa

from sensor.l7 import registry

U8, U16, U32, U64 = pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64()
STR, BOOL, I32, I64 = pa.string(), pa.bool_(), pa.int32(), pa.int64()
SUMMARY = pa.map_(STR, STR)

ARROW_TYPES: Mapping[str, pa.DataType] = MappingProxyType({
    "u8": U8, "u16": U16, "u32": U32, "u64": U64, "i32": I32, "i64": I64,
    "str": STR, "bool": BOOL, "list<str>": pa.list_(STR),
    "counts": STR,   # registry.Counts as JSON text: '{"card.response":1}' (HTTP pii)
})

FLOW_COLUMNS = [
    ("uid", STR), ("sensor_id", STR), ("flow_start_ns", U64), ("flow_end_ns", U64),
    ("src_addr", STR), ("dst_addr", STR), ("src_port", U16), ("dst_port", U16),
    ("protocol", U8), ("ip_version", U8), ("vlan_id", U16), ("inner_vlan_id", U16),
    ("ifindex", U32), ("initiator_octets", U64), ("responder_octets", U64),
    ("initiator_packets", U64), ("responder_packets", U64), ("initiator_l2_octets", U64),
    ("responder_l2_octets", U64), ("initiator_tcp_flags", U16), ("responder_tcp_flags", U16),
    ("tcp_syn_count", U64), ("tcp_fin_count", U64), ("tcp_rst_count", U64),
    ("flow_end_reason", U8), ("conn_state", STR), ("history", STR), ("handshake_rtt_ns", U64),
    ("community_id", STR), ("app_proto", STR),
    ("l7_coverage_inspected", BOOL), ("l7_coverage_sampled", BOOL),
    ("l7_coverage_captured_octets", U64), ("l7_coverage_truncated_octets", U64),
    ("l7_coverage_gap_octets", U64), ("l7_coverage_skipped_octets", U64),
    ("process_pid", U32), ("process_comm", STR), ("process_exe", STR), ("process_uid", U32),
    ("process_user", STR), ("process_cgroup_id", U64), ("process_container_id", STR),
    ("http_host", STR), ("dns_qname", STR), ("tls_sni", STR), ("tls_ja4", STR),
    ("icmp_type", U8), ("icmp_code", U8),
    # The app_proto's own summary keys (Flow.l7_summary): MAP(VARCHAR, VARCHAR) in DuckDB
    # and Parquet, Nested(key, value) in ClickHouse (collector/storage/clickhouse.py).
    ("l7_summary", SUMMARY),
    # Geo and ASN of each end (sensor/enrich/geo.py, docs/geo.md).
    ("src_country", STR), ("src_city", STR), ("src_asn", U32),
    ("dst_country", STR), ("dst_city", STR), ("dst_asn", U32),
]

# Columns every L7 table shares (the L7Event envelope), then the detail's fields.
L7_COLUMNS = [
    ("uid", STR), ("sensor_id", STR), ("community_id", STR), ("ts_ns", U64),
    ("src_addr", STR), ("dst_addr", STR), ("src_port", U16), ("dst_port", U16),
    ("protocol", U8), ("source", STR),
]

LOST_COLUMNS = [
    ("source", STR), ("count", U64), ("interval_start_ns", U64), ("interval_end_ns", U64),
    ("sensor_id", STR),
]

ALERT_COLUMNS = [
    ("rule_id", STR), ("action", STR), ("field", STR), ("excerpt", STR), ("reason", STR),
    ("severity", STR), ("category", STR), ("community_id", STR), ("uid", STR), ("ts_ns", U64),
    ("event_kind", STR), ("src_addr", STR), ("dst_addr", STR), ("src_port", U16),
    ("dst_port", U16), ("sensor_id", STR), ("count", U64),
    ("enforced", BOOL), ("block_expires_ns", U64), ("held_ns", U64),
    # DDoS detections (sensor/rules/ddos.py)
    ("rate", U64), ("top_sources", STR), ("mitigation", STR), ("window_ns", U64),
    ("baseline", U64),
]


def _arrow(col: registry.Column) -> pa.DataType:
    if col.type == "list<struct>":
        return pa.list_(pa.struct([(m.name, _arrow(m)) for m in col.members]))
    return ARROW_TYPES[col.type]


def detail_columns(spec: registry.Protocol) -> list[tuple[str, pa.DataType]]:
    """A registered protocol's detail columns, in its event dataclass's field order."""
    return [(c.name, _arrow(c)) for c in registry.columns(spec.event, spec.column_types)]


def kind_columns() -> dict[str, list[tuple[str, pa.DataType]]]:
    """Table name -> columns, for every record kind (flows, each L7 kind, lost)."""
    out = {"flows": FLOW_COLUMNS}
    for spec in registry.kinds():
        out[spec.table_name] = L7_COLUMNS + detail_columns(spec)
    out["lost"] = LOST_COLUMNS
    out["alerts"] = ALERT_COLUMNS
    return out


def kind_tables() -> dict[str, str]:
    """Record kind (as sensor.model.record_kind names it) -> table name."""
    out = {"flow": "flows"}
    out.update((spec.name, spec.table_name) for spec in registry.kinds())
    out["lost"] = "lost"
    out["alert"] = "alerts"
    return out
