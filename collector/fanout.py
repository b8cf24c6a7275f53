"""Subscribe fan-out across collectors: a live stream on any collector carries the records
that arrived at its peers too.

Design: peer forwarding, push, over the Observer API every collector already serves. A
collector given `[cluster] peers` (the other collectors in front of the same store) opens
one follow-mode Subscribe to each peer, with no filter, marked as a peer feed in the call's
metadata (PEER_FEED). A collector answers a peer feed with the records *it* ingested only,
never the ones it was fed by its own peers, so a full mesh (every collector lists every
other) delivers each record once and never loops. What arrives is offered to this
collector's live subscribers (Hub.publish_forwarded), whose own filters then apply as for
local records.

Why not poll the shared store for rows by receive time: there is no index on receive time
(the tables are ordered for analysts' queries: hour, service, address), so each poll would
scan the day's partition of every table on every collector, about once a second. A peer
feed costs one stream per pair and moves each record once per peer, only while it is new.

What it guarantees. History (`--since`, `--last`) reads the shared store, so it holds
every collector's records. The live part from peers is best effort, as a slow subscriber
is: a record a peer committed shortly before the feed (re)connects, or while it was down,
is not forwarded (it is in the store: a `--since` query finds it); a slow feed gets the
peer's LostEvents (source "subscriber_slow"), which subscribers here see like any record.
Records of a peer's batches that were stored live from the moment of registration may
also come from history when a subscription with `--since` starts within the forwarding
delay (milliseconds) of their commit: such a record can then appear twice at that seam.

Merged views. The analytics views (Observer.Endpoints: the endpoint inventory;
Observer.Clients: client behaviour) are kept per collector, fed by the batches that
collector stored. Asked without the peer marker, a collector with peers asks each of them
for its whole local view (the same PEER_FEED metadata, so a peer answers with its own
state only and a mesh never loops), with a short timeout (PEER_VIEW_TIMEOUT_S), and
merges the answers with its own through the merge that reads a stored state back
(Inventory.merge, Client.merge): the result is what one collector fed every batch would
show, filters applied after the merge. Service statistics are not merged yet: their RPC
carries quantiles, not the DDSketch cells that would merge. A peer that does not answer in
time is named in the response (unreachable_peers) and the CLI warns that the view is
partial; it is never an error, a view of what is reachable beats none.

Reconnect: a broken feed is reopened after a jittered backoff from 0.2 s to 10 s, the same
schedule the sensor's exporter uses towards collectors, so a restarted peer is followed
again within seconds.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import grpc

from collector.client import MAX_MESSAGE_BYTES
from sensor.errors import ConfigError
from sensor.export import wire

__all__ = ["PEER_FEED", "PeerFeed", "PeerTls", "is_peer_feed"]

log = logging.getLogger(__name__)

# Call metadata that marks a Subscribe as a peer collector's feed (lower case: gRPC
# metadata keys are).
PEER_FEED = ("loupe-peer-feed", "1")

# A merged view waits this long for a peer's local view: a peer down is refused at once,
# this bounds a peer that hangs, well inside the analyst's own --timeout (30 s default).
PEER_VIEW_TIMEOUT_S = 3.0

INITIAL_BACKOFF_S = 0.2
MAX_BACKOFF_S = 10.0


def is_peer_feed(context) -> bool:
    """Whether a call is a peer collector's (a Subscribe feed or a view for merging): it
    is answered with this collector's own records or state only."""
    return any((k, v) == PEER_FEED for k, v in (context.invocation_metadata() or ()))


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerTls:
    """mTLS towards peers: the CA that signed their certificates, and this collector's
    client certificate and key (an analyst or admin certificate: the feed reads records)."""

    ca_cert: Path
    client_cert: Path
    client_key: Path

    def credentials(self) -> grpc.ChannelCredentials:
        def read(what: str, path: Path) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read the {what} {path} for the peer feeds: "
                                  f"{exc.strerror or exc}; set [cluster] cert_file and "
                                  "key_file to an analyst certificate (`loupe certs init`)"
                                  ) from None

        return grpc.ssl_channel_credentials(
            root_certificates=read("CA certificate", self.ca_cert),
            private_key=read("client key", self.client_key),
            certificate_chain=read("client certificate", self.client_cert))


class PeerFeed:
    """One follow-mode Subscribe per peer, feeding `hub` (collector/observer.py)."""

    def __init__(self, peers: tuple[str, ...], hub, *, tls: PeerTls | None = None,
                 rng: random.Random | None = None) -> None:
        self._peers = peers
        self._hub = hub
        self._creds = tls.credentials() if tls is not None else None
        self._rng = rng or random.Random()
        self.counters = {"peer_records": 0, "peer_reconnects": 0, "peer_feeds_up": 0}

    async def run(self) -> None:
        await asyncio.gather(*(self._follow(peer) for peer in self._peers))

    def _channel(self, peer: str, options=None) -> grpc.aio.Channel:
        if self._creds is not None:
            return grpc.aio.secure_channel(peer, self._creds, options=options)
        return grpc.aio.insecure_channel(peer, options=options)

    async def _follow(self, peer: str) -> None:
        from loupe.v1 import observer_pb2_grpc  # noqa: PLC0415 (generated at build time)

        attempt = 0
        while True:
            got = False
            channel = self._channel(peer)
            try:
                call = observer_pb2_grpc.ObserverStub(channel).Subscribe(
                    wire.observer_pb2.SubscribeRequest(follow=True), metadata=(PEER_FEED,))
                self.counters["peer_feeds_up"] += 1
                try:
                    got = await self._forward(call)
                finally:
                    self.counters["peer_feeds_up"] -= 1
                log.warning("peer collector %s ended its feed; reconnecting", peer)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                    log.error("peer collector %s refused the feed: %s", peer, exc.details())
                else:
                    log.warning("peer collector %s: feed ended (%s: %s); reconnecting", peer,
                                exc.code().name, exc.details())
            finally:
                await channel.close()
            attempt = 0 if got else attempt + 1
            self.counters["peer_reconnects"] += 1
            base = min(MAX_BACKOFF_S, INITIAL_BACKOFF_S * 2 ** min(attempt, 16))
            await asyncio.sleep(base * self._rng.uniform(0.8, 1.2))

    async def ask(self, rpc: str, request,
                  timeout: float = PEER_VIEW_TIMEOUT_S) -> tuple[list, list[str]]:
        """Call the unary Observer method `rpc` on every peer at once, as a peer: (the
        answers of those that gave one, the peers that did not, each as "address (why)")."""
        from loupe.v1 import observer_pb2_grpc  # noqa: PLC0415 (generated at build time)

        async def one(peer: str):
            # A whole inventory is one message: accept what a peer may send by default,
            # as the CLI does; a larger one is reported as that peer's failure.
            channel = self._channel(peer, options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
            try:
                stub = observer_pb2_grpc.ObserverStub(channel)
                return await getattr(stub, rpc)(request, timeout=timeout,
                                                metadata=(PEER_FEED,))
            except grpc.aio.AioRpcError as exc:
                log.warning("peer collector %s did not answer %s: %s: %s", peer, rpc,
                            exc.code().name, exc.details())
                return f"{peer} ({exc.code().name.lower()})"
            finally:
                await channel.close()

        answers = await asyncio.gather(*(one(p) for p in self._peers))
        return ([a for a in answers if not isinstance(a, str)],
                [a for a in answers if isinstance(a, str)])

    async def _forward(self, call) -> bool:
        """Hand the feed's records to the hub as they come; whether any came."""
        got = False
        async for resp in call:
            got = True
            self._hub.publish_forwarded((resp.record,))
            self.counters["peer_records"] += 1
        return got
