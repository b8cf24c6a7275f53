"""Client notices as Alert records, made by the collector itself.

The notices (collector/clients/model.py) need every sensor's history, so they cannot be
rule matches in a sensor; as Alerts they still land where analysts look for alerts: the
`alerts` table, `loupe tail --type alert`, `--alert-rule 'loupe-client-*'`, the console.

They enter through the collector's own ingest path, as a batch of sensor COLLECTOR_ID:
decoded and validated like a sensor's, stored in one transaction, deduplicated on
(sensor_id, batch_id) (the batch id is the wall clock in ns, so a restart never reuses
one), then offered to live subscribers. At most MAX_PER_BATCH per tick; the rest wait.
"""

from __future__ import annotations

import logging
import time

from collector.clients.model import Notice
from sensor import model
from sensor.export import wire

log = logging.getLogger(__name__)

COLLECTOR_ID = "collector"
# Alerts per tick (one tick per INVENTORY_SAVE_S): a burst of new clients (a scan, a
# restart of a busy estate) becomes a few batches, not one huge one.
MAX_PER_BATCH = 1000

RULES = {
    "new_client": ("loupe-client-new", "low", "a client never seen before"),
    "new_country": ("loupe-client-new-country", "medium",
                    "a known client seen from a new country"),
    "unusual_volume": ("loupe-client-volume", "medium",
                       "a client's requests this minute far above its usual rate"),
}


def alert_of(n: Notice) -> model.Alert:
    rule_id, severity, reason = RULES[n.kind]
    return model.Alert(
        rule_id=rule_id, action="alert", field="client", excerpt=n.detail[:model.MAX_EXCERPT],
        reason=reason, severity=severity, category="client", ts_ns=n.ts_ns,
        event_kind="client", src_addr=n.address, sensor_id=COLLECTOR_ID, count=1)


def batch_of(notices: list[Notice], batch_id: int | None = None):
    """A RecordBatch of the notices' alerts."""
    return wire.ingest_pb2.RecordBatch(
        sensor_id=COLLECTOR_ID, batch_id=batch_id or time.time_ns(),
        records=[wire.to_proto(alert_of(n)) for n in notices])


async def publish(writer, hub, notices: list[Notice]) -> int:
    """Store the notices as Alerts and offer them to live subscribers; how many stored."""
    stored = 0
    for i in range(0, len(notices), MAX_PER_BATCH):
        batch = batch_of(notices[i:i + MAX_PER_BATCH])
        result = await writer.store(batch, batch.SerializeToString(), None)
        if result.ack.status == wire.ingest_pb2.ACK_STATUS_STORED:
            hub.publish(result.seq, batch, None)
            stored += len(batch.records)
        else:
            log.warning("client notices not stored as alerts: %s", result.ack.message)
    return stored
