"""The stored shape of Loupe records: one table per record kind, one column per model field.

The columns follow sensor/model.py field for field. Nested values are flattened into
prefixed columns (Flow.l7_coverage -> l7_coverage_*, Flow.process -> process_*), lists
stay lists (DNS answers as LIST(STRUCT), TLS ALPN and SANs as LIST(VARCHAR)), so SQL needs
no JSON functions. Every table also carries two collector columns:

- received_ns: when the collector stored the row (wall clock). Retention ages rows by it,
  so replayed captures with old packet times are kept for the full retention period.
- batch_seq: the collector's commit sequence number of the batch the row came in. Live
  subscriptions use it to stitch stored history and the live stream without a gap or a
  duplicate (see collector/observer.py).

Arrow types are the single definition; the DuckDB DDL is derived from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

U8, U16, U32, U64 = pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64()
STR, BOOL, I32 = pa.string(), pa.bool_(), pa.int32()

DNS_ANSWER = pa.struct([("name", STR), ("rtype", U16), ("ttl", U32), ("data", STR)])

COLLECTOR_COLUMNS = [("received_ns", U64), ("batch_seq", U64)]

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
]

# Columns every L7 table shares (the L7Event envelope), then the detail's fields.
L7_COLUMNS = [
    ("uid", STR), ("sensor_id", STR), ("community_id", STR), ("ts_ns", U64),
    ("src_addr", STR), ("dst_addr", STR), ("src_port", U16), ("dst_port", U16),
    ("protocol", U8),
]

HTTP_COLUMNS = [
    ("method", STR), ("host", STR), ("path", STR), ("version", STR), ("status", U16),
    ("reason", STR), ("user_agent", STR), ("request_content_type", STR),
    ("response_content_type", STR), ("request_body_len", U64), ("response_body_len", U64),
    ("latency_ns", U64),
]

DNS_COLUMNS = [
    ("id", U16), ("qname", STR), ("qtype", U16), ("qclass", U16), ("rcode", I32),
    ("answers", pa.list_(DNS_ANSWER)), ("latency_ns", U64), ("transport", STR),
    ("truncated", BOOL),
]

TLS_COLUMNS = [
    ("version", U16), ("client_version", U16), ("sni", STR), ("alpn", pa.list_(STR)),
    ("alpn_selected", STR), ("cipher", U16), ("ja3", STR), ("ja3s", STR), ("ja4", STR),
    ("cert_subject", STR), ("cert_issuer", STR), ("cert_san", pa.list_(STR)),
    ("cert_not_before_ns", U64), ("cert_not_after_ns", U64),
]

LOST_COLUMNS = [
    ("source", STR), ("count", U64), ("interval_start_ns", U64), ("interval_end_ns", U64),
    ("sensor_id", STR),
]


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    schema: pa.Schema
    time_column: str  # the record's own time: `since` filters and ordering use it


def _schema(*groups) -> pa.Schema:
    return pa.schema([pa.field(n, t) for group in groups for n, t in group])


TABLES: dict[str, Table] = {
    "flows": Table("flows", _schema(FLOW_COLUMNS, COLLECTOR_COLUMNS), "flow_end_ns"),
    "http": Table("http", _schema(L7_COLUMNS, HTTP_COLUMNS, COLLECTOR_COLUMNS), "ts_ns"),
    "dns": Table("dns", _schema(L7_COLUMNS, DNS_COLUMNS, COLLECTOR_COLUMNS), "ts_ns"),
    "tls": Table("tls", _schema(L7_COLUMNS, TLS_COLUMNS, COLLECTOR_COLUMNS), "ts_ns"),
    "lost": Table("lost", _schema(LOST_COLUMNS, COLLECTOR_COLUMNS), "interval_end_ns"),
}

# Record kind (as sensor.model.record_kind names it) -> table.
KIND_TABLE = {"flow": "flows", "http": "http", "dns": "dns", "tls": "tls", "lost": "lost"}

_DUCKDB_TYPES = {
    U8: "UTINYINT", U16: "USMALLINT", U32: "UINTEGER", U64: "UBIGINT",
    I32: "INTEGER", STR: "VARCHAR", BOOL: "BOOLEAN",
}


def duckdb_type(arrow_type: pa.DataType) -> str:
    if pa.types.is_list(arrow_type):
        return duckdb_type(arrow_type.value_type) + "[]"
    if pa.types.is_struct(arrow_type):
        inner = ", ".join(
            f"{arrow_type.field(i).name} {duckdb_type(arrow_type.field(i).type)}"
            for i in range(arrow_type.num_fields)
        )
        return f"STRUCT({inner})"
    return _DUCKDB_TYPES[arrow_type]


def create_table_sql(table: Table) -> str:
    cols = ", ".join(f'"{f.name}" {duckdb_type(f.type)}' for f in table.schema)
    return f"CREATE TABLE IF NOT EXISTS {table.name} ({cols})"


def _strip(row: dict, prefix: str) -> dict:
    return {k[len(prefix):]: row.pop(k) for k in [k for k in row if k.startswith(prefix)]}


def record_from_row(table: str, row: dict):
    """A stored row (column -> value, collector columns included) back to a model record."""
    from sensor import model  # the model is only needed on the read side

    row = {k: v for k, v in row.items() if k not in ("received_ns", "batch_seq")}
    if table == "flows":
        coverage = _strip(row, "l7_coverage_")
        process = _strip(row, "process_")
        row["l7_coverage"] = model.L7Coverage(**coverage)
        if any(process.values()):
            row["process"] = model.ProcessInfo(**process)
        return model.Flow(**row)
    if table == "lost":
        return model.LostEvent(**row)
    envelope = {n: row.pop(n) for n, _ in L7_COLUMNS}
    if table == "http":
        detail = model.HttpEvent(**row)
    elif table == "dns":
        row["answers"] = tuple(model.DnsAnswer(**a) for a in row["answers"] or ())
        detail = model.DnsEvent(**row)
    else:
        row["alpn"] = tuple(row["alpn"] or ())
        row["cert_san"] = tuple(row["cert_san"] or ())
        detail = model.TlsEvent(**row)
    return model.L7Event(**envelope, detail=detail)
