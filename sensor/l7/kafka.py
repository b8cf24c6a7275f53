"""Kafka requests paired with their responses, from a TCP stream, sans-I/O.

Strategy
- Framing: every message, either way, is an INT32 size then that many bytes (Kafka protocol
  guide, "Protocol Framing"). Each direction is framed on its own, so a body Loupe cannot read
  never costs the framing: only a bad size or a bad request header does (state ERROR).
- A request starts with its header: api key, api version, correlation id, then (header v1+)
  the client id; a flexible version (KIP-482) adds tagged fields to the header and uses
  compact strings, compact arrays (unsigned varint lengths, plus one) and tagged fields in the
  body. Which versions are flexible comes from API_VERSIONS, the Kafka JSON schemas' values.
- A response starts with the correlation id of its request (plus tagged fields when the
  request was flexible, except ApiVersions, whose response header is always v0). Its layout
  depends on the request's api key and version, so requests wait in a map by correlation id,
  bounded by MAX_PENDING (oldest reported without a response past it).
- Bodies are read by one generator per message (_walk_request, _walk_response): it yields n > 0
  for the next n bytes or -n to skip n bytes, and _pump hands them over from whatever segments
  have arrived. So nothing beyond one field is ever buffered, a field split across segments
  costs nothing special, and skip_hint() can hand a skipped range to the kernel. Record
  batches are never decoded: a batch's count comes from its header (record batch v2, or one
  per legacy message) and the rest of the batch is skipped, so a 10 MiB Produce costs a few
  header reads. Whatever the walker leaves of a message (fields after the ones read) is skipped.
- Parsed bodies (topics, partitions, group, errors): Produce, Fetch, ListOffsets, Metadata,
  OffsetCommit, OffsetFetch, FindCoordinator, JoinGroup, SyncGroup, Heartbeat, LeaveGroup,
  ApiVersions, SaslHandshake, SaslAuthenticate, InitProducerId. Other known APIs get their
  header, latency and sizes; unknown api keys (or versions newer than the table) are counted
  (`unknown_apis`, `unknown_versions`) and reported the same way, never fatal.
- A body that does not follow its layout is contained: the event is marked `malformed`, the
  rest of that message is skipped, the next message is read normally.
- SASL: SaslAuthenticate tokens are never copied. Only the user name is taken from a PLAIN
  token (authzid NUL authcid NUL password) or a SCRAM client-first message (n=user); the
  password and every other token byte are skipped unread. A successful SaslHandshake v0 is
  followed by raw, length-framed tokens with no Kafka header (KIP-43): those frames are
  skipped unread and counted (`sasl_tokens`) until the client sends a request again.
- Produce with acks=0 gets no response: its event is emitted when the request ends.
"""

from __future__ import annotations

import struct
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass

from sensor.l7.base import NEED_DATA, Direction, ParserState, Transaction, _NeedData
from sensor.l7.registry import Filter, Protocol

APP_PROTO = "kafka"
PORTS = (9092,)
SUMMARY_FIELDS = ("kafka_client_id", "kafka_topic")

_OK, _DONE, _ERROR = ParserState.OK, ParserState.DONE, ParserState.ERROR
_TO_SERVER, _TO_CLIENT = Direction.TO_SERVER, Direction.TO_CLIENT

# A message larger than this is not Kafka: the broker refuses requests over
# socket.request.max.bytes (100 MiB by default) and responses are bounded by fetch.max.bytes
# (50 MiB by default); 1 GiB leaves room for brokers configured far above both.
MAX_FRAME = 1 << 30
# The signature is stricter: a first request above the broker's default limit is not one.
MAX_SIGNATURE_FRAME = 100 << 20
# Requests waiting for their response. Clients keep a handful in flight per connection
# (max.in.flight.requests.per.connection, 5 by default); past this many the oldest is reported
# without its response (`evicted`) and a response to it is then unmatched.
MAX_PENDING = 1024
# Kept of one client id (Java clients use "consumer-<group>-<n>", "producer-<n>"): enough to
# tell clients apart; the rest is skipped and the event marked truncated.
MAX_CLIENT_ID = 256
# Topic names are at most 249 characters (Kafka's Topic.MAX_NAME_LENGTH); longer ones are cut.
MAX_TOPIC = 249
# Topics listed per event; a Fetch of a consumer subscribed to hundreds names them all, and
# the event keeps the first 64 (truncated set) while `partitions` still counts every one.
MAX_TOPICS = 64
# Group ids, coordinator keys, error messages, SASL mechanism and client software name.
MAX_TEXT = 256
# A SASL PLAIN or SCRAM token is read only this far, for the user name (SASLprep'd names
# are short); the rest, where the password or proof is, is skipped unread.
MAX_SASL_PEEK = 256
# Tagged fields per tagged-field section, and elements of one array: more than the bytes
# left in the message is garbage (each takes at least one byte).
_MAX_VARINT_BYTES = 5  # an unsigned varint of 32 bits takes at most five bytes

# api key -> (name, newest version known, first flexible version or -1), as in the Kafka
# JSON message schemas (clients/src/main/resources/common/message/*Request.json). A newer
# version than listed is counted as unknown; its body is not read.
API_VERSIONS: dict[int, tuple[str, int, int]] = {
    0: ("Produce", 13, 9), 1: ("Fetch", 18, 12), 2: ("ListOffsets", 11, 6),
    3: ("Metadata", 13, 9), 4: ("LeaderAndIsr", 7, 4), 5: ("StopReplica", 4, 2),
    6: ("UpdateMetadata", 8, 6), 7: ("ControlledShutdown", 3, 3),
    8: ("OffsetCommit", 10, 8), 9: ("OffsetFetch", 10, 6), 10: ("FindCoordinator", 6, 3),
    11: ("JoinGroup", 9, 6), 12: ("Heartbeat", 4, 4), 13: ("LeaveGroup", 5, 4),
    14: ("SyncGroup", 5, 4), 15: ("DescribeGroups", 6, 5), 16: ("ListGroups", 5, 3),
    17: ("SaslHandshake", 1, -1), 18: ("ApiVersions", 4, 3), 19: ("CreateTopics", 7, 5),
    20: ("DeleteTopics", 6, 4), 21: ("DeleteRecords", 2, 2), 22: ("InitProducerId", 6, 2),
    23: ("OffsetForLeaderEpoch", 4, 4), 24: ("AddPartitionsToTxn", 5, 3),
    25: ("AddOffsetsToTxn", 4, 3), 26: ("EndTxn", 5, 3), 27: ("WriteTxnMarkers", 2, 1),
    28: ("TxnOffsetCommit", 5, 3), 29: ("DescribeAcls", 3, 2), 30: ("CreateAcls", 3, 2),
    31: ("DeleteAcls", 3, 2), 32: ("DescribeConfigs", 4, 4), 33: ("AlterConfigs", 2, 2),
    34: ("AlterReplicaLogDirs", 2, 2), 35: ("DescribeLogDirs", 5, 2),
    36: ("SaslAuthenticate", 2, 2), 37: ("CreatePartitions", 3, 2),
    38: ("CreateDelegationToken", 3, 2), 39: ("RenewDelegationToken", 2, 2),
    40: ("ExpireDelegationToken", 2, 2), 41: ("DescribeDelegationToken", 3, 2),
    42: ("DeleteGroups", 2, 2), 43: ("ElectLeaders", 2, 2),
    44: ("IncrementalAlterConfigs", 1, 1), 45: ("AlterPartitionReassignments", 1, 0),
    46: ("ListPartitionReassignments", 0, 0), 47: ("OffsetDelete", 0, -1),
    48: ("DescribeClientQuotas", 1, 1), 49: ("AlterClientQuotas", 1, 1),
    50: ("DescribeUserScramCredentials", 0, 0), 51: ("AlterUserScramCredentials", 0, 0),
    52: ("Vote", 2, 0), 53: ("BeginQuorumEpoch", 1, 0), 54: ("EndQuorumEpoch", 1, 0),
    55: ("DescribeQuorum", 2, 0), 56: ("AlterPartition", 3, 0), 57: ("UpdateFeatures", 2, 0),
    58: ("Envelope", 0, 0), 59: ("FetchSnapshot", 1, 0), 60: ("DescribeCluster", 2, 0),
    61: ("DescribeProducers", 0, 0), 62: ("BrokerRegistration", 4, 0),
    63: ("BrokerHeartbeat", 1, 0), 64: ("UnregisterBroker", 0, 0),
    65: ("DescribeTransactions", 0, 0), 66: ("ListTransactions", 2, 0),
    67: ("AllocateProducerIds", 0, 0), 68: ("ConsumerGroupHeartbeat", 1, 0),
    69: ("ConsumerGroupDescribe", 1, 0), 70: ("ControllerRegistration", 0, 0),
    71: ("GetTelemetrySubscriptions", 0, 0), 72: ("PushTelemetry", 0, 0),
    73: ("AssignReplicasToDirs", 0, 0), 74: ("ListConfigResources", 1, 0),
    75: ("DescribeTopicPartitions", 0, 0), 76: ("ShareGroupHeartbeat", 1, 0),
    77: ("ShareGroupDescribe", 1, 0), 78: ("ShareFetch", 1, 0), 79: ("ShareAcknowledge", 1, 0),
    80: ("AddRaftVoter", 0, 0), 81: ("RemoveRaftVoter", 0, 0), 82: ("UpdateRaftVoter", 0, 0),
}

# Broker error codes (Kafka's Errors enum), -1 .. 127, by code.
_ERROR_NAMES = (
    "UNKNOWN_SERVER_ERROR NONE OFFSET_OUT_OF_RANGE CORRUPT_MESSAGE UNKNOWN_TOPIC_OR_PARTITION "
    "INVALID_FETCH_SIZE LEADER_NOT_AVAILABLE NOT_LEADER_OR_FOLLOWER REQUEST_TIMED_OUT "
    "BROKER_NOT_AVAILABLE REPLICA_NOT_AVAILABLE MESSAGE_TOO_LARGE STALE_CONTROLLER_EPOCH "
    "OFFSET_METADATA_TOO_LARGE NETWORK_EXCEPTION COORDINATOR_LOAD_IN_PROGRESS "
    "COORDINATOR_NOT_AVAILABLE NOT_COORDINATOR INVALID_TOPIC_EXCEPTION RECORD_LIST_TOO_LARGE "
    "NOT_ENOUGH_REPLICAS NOT_ENOUGH_REPLICAS_AFTER_APPEND INVALID_REQUIRED_ACKS "
    "ILLEGAL_GENERATION INCONSISTENT_GROUP_PROTOCOL INVALID_GROUP_ID UNKNOWN_MEMBER_ID "
    "INVALID_SESSION_TIMEOUT REBALANCE_IN_PROGRESS INVALID_COMMIT_OFFSET_SIZE "
    "TOPIC_AUTHORIZATION_FAILED GROUP_AUTHORIZATION_FAILED CLUSTER_AUTHORIZATION_FAILED "
    "INVALID_TIMESTAMP UNSUPPORTED_SASL_MECHANISM ILLEGAL_SASL_STATE UNSUPPORTED_VERSION "
    "TOPIC_ALREADY_EXISTS INVALID_PARTITIONS INVALID_REPLICATION_FACTOR "
    "INVALID_REPLICA_ASSIGNMENT INVALID_CONFIG NOT_CONTROLLER INVALID_REQUEST "
    "UNSUPPORTED_FOR_MESSAGE_FORMAT POLICY_VIOLATION OUT_OF_ORDER_SEQUENCE_NUMBER "
    "DUPLICATE_SEQUENCE_NUMBER INVALID_PRODUCER_EPOCH INVALID_TXN_STATE "
    "INVALID_PRODUCER_ID_MAPPING INVALID_TRANSACTION_TIMEOUT CONCURRENT_TRANSACTIONS "
    "TRANSACTION_COORDINATOR_FENCED TRANSACTIONAL_ID_AUTHORIZATION_FAILED SECURITY_DISABLED "
    "OPERATION_NOT_ATTEMPTED KAFKA_STORAGE_ERROR LOG_DIR_NOT_FOUND SASL_AUTHENTICATION_FAILED "
    "UNKNOWN_PRODUCER_ID REASSIGNMENT_IN_PROGRESS DELEGATION_TOKEN_AUTH_DISABLED "
    "DELEGATION_TOKEN_NOT_FOUND DELEGATION_TOKEN_OWNER_MISMATCH "
    "DELEGATION_TOKEN_REQUEST_NOT_ALLOWED DELEGATION_TOKEN_AUTHORIZATION_FAILED "
    "DELEGATION_TOKEN_EXPIRED INVALID_PRINCIPAL_TYPE NON_EMPTY_GROUP GROUP_ID_NOT_FOUND "
    "FETCH_SESSION_ID_NOT_FOUND INVALID_FETCH_SESSION_EPOCH LISTENER_NOT_FOUND "
    "TOPIC_DELETION_DISABLED FENCED_LEADER_EPOCH UNKNOWN_LEADER_EPOCH "
    "UNSUPPORTED_COMPRESSION_TYPE STALE_BROKER_EPOCH OFFSET_NOT_AVAILABLE MEMBER_ID_REQUIRED "
    "PREFERRED_LEADER_NOT_AVAILABLE GROUP_MAX_SIZE_REACHED FENCED_INSTANCE_ID "
    "ELIGIBLE_LEADERS_NOT_AVAILABLE ELECTION_NOT_NEEDED NO_REASSIGNMENT_IN_PROGRESS "
    "GROUP_SUBSCRIBED_TO_TOPIC INVALID_RECORD UNSTABLE_OFFSET_COMMIT THROTTLING_QUOTA_EXCEEDED "
    "PRODUCER_FENCED RESOURCE_NOT_FOUND DUPLICATE_RESOURCE UNACCEPTABLE_CREDENTIAL "
    "INCONSISTENT_VOTER_SET INVALID_UPDATE_VERSION FEATURE_UPDATE_FAILED "
    "PRINCIPAL_DESERIALIZATION_FAILURE SNAPSHOT_NOT_FOUND POSITION_OUT_OF_RANGE "
    "UNKNOWN_TOPIC_ID DUPLICATE_BROKER_REGISTRATION BROKER_ID_NOT_REGISTERED "
    "INCONSISTENT_TOPIC_ID INCONSISTENT_CLUSTER_ID TRANSACTIONAL_ID_NOT_FOUND "
    "FETCH_SESSION_TOPIC_ID_ERROR INELIGIBLE_REPLICA NEW_LEADER_ELECTED "
    "OFFSET_MOVED_TO_TIERED_STORAGE FENCED_MEMBER_EPOCH UNRELEASED_INSTANCE_ID "
    "UNSUPPORTED_ASSIGNOR STALE_MEMBER_EPOCH MISMATCHED_ENDPOINT_TYPE UNSUPPORTED_ENDPOINT_TYPE "
    "UNKNOWN_CONTROLLER_ID UNKNOWN_SUBSCRIPTION_ID TELEMETRY_TOO_LARGE INVALID_REGISTRATION "
    "TRANSACTION_ABORTABLE INVALID_RECORD_STATE SHARE_SESSION_NOT_FOUND "
    "INVALID_SHARE_SESSION_EPOCH FENCED_STATE_EPOCH INVALID_VOTER_KEY DUPLICATE_VOTER "
    "VOTER_NOT_FOUND"
).split()


def error_name(code: int) -> str:
    """The name of a broker error code ("" for 0 and for codes newer than the table)."""
    if code == 0 or not -1 <= code < len(_ERROR_NAMES) - 1:
        return ""
    return _ERROR_NAMES[code + 1]


COMPRESSION = ("none", "gzip", "snappy", "lz4", "zstd")

_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_HEAD = struct.Struct(">hhi")       # api key, api version, correlation id
_I16I32 = struct.Struct(">hi")
_I32I16 = struct.Struct(">ih")
_MAX_I64 = (1 << 63) - 1
_INT_ONLY = {int}
_ZERO_UUID = bytes(16)


def _send(gen, value):
    """The walker's next request, or None when it is done with its message."""
    try:
        return gen.send(value)
    except StopIteration:
        return None


def _throw(gen):
    """Tell the walker its field runs past the message; None when it is done (a body it
    gives up on); a header it cannot give up on raises _BadBody out of here."""
    try:
        return gen.throw(_BadBody("a field runs past the end of its message"))
    except StopIteration:
        return None


class _Malformed(Exception):
    """The peer sent something that is not Kafka framing. Never escapes the parser."""


class _BadBody(Exception):
    """A message body does not follow its API's layout: the message is skipped, not the flow."""


@dataclass(frozen=True, slots=True, kw_only=True)
class KafkaEvent:
    """One request and its response (or the request alone: acks=0 Produce, end of capture)."""

    api_key: int = 0
    api: str = ""                   # "Produce", ...; "" for an api key not in API_VERSIONS
    api_version: int = 0
    correlation_id: int = 0         # signed 32-bit, as on the wire
    client_id: str = ""
    topic: str = ""                 # the first topic named (what tail --kafka-topic matches)
    topics: tuple[str, ...] = ()    # topic names, at most MAX_TOPICS, each once, in order
    topic_ids: tuple[str, ...] = ()  # topic UUIDs (Produce/Fetch v13+, Metadata v10+ ...)
    partitions: int = 0             # partition entries of the request (of the response when
                                    # the request named none, e.g. Metadata for all topics)
    group: str = ""                 # consumer group, or FindCoordinator's key
    records: int = 0                # Produce request / Fetch response: records in batches
    batches: int = 0                # record batches (legacy messages count one each)
    record_bytes: int = 0           # bytes of the records fields, batch headers included
    compression: str = ""           # of the first batch: none, gzip, snappy, lz4, zstd
    error_code: int = 0             # the first non-zero error code of the response
    error: str = ""                 # its name (error_name)
    errors: int = 0                 # non-zero error codes in the response
    error_message: str = ""         # a response's error message, when it has one
    mechanism: str = ""             # SaslHandshake's mechanism
    sasl_user: str = ""             # user of a PLAIN or SCRAM SaslAuthenticate (never the secret)
    software: str = ""              # ApiVersions v3+: "client software name/version"
    request_bytes: int = 0          # the request frame, size prefix included
    response_bytes: int = 0         # 0: no response seen
    truncated: bool = False         # a string or the topic list was cut to its bound
    malformed: bool = False         # a body did not follow its layout; fields after the fault are missing
    latency_ns: int = 0

    def __post_init__(self) -> None:
        # The all-valid case in one pass, without a loop (one event per transaction).
        values = (self.partitions, self.records, self.batches, self.record_bytes, self.errors,
                  self.request_bytes, self.response_bytes, self.latency_ns)
        if set(map(type, values)) != _INT_ONLY or min(values) < 0 or max(values) > _MAX_I64:
            names = ("partitions", "records", "batches", "record_bytes", "errors",
                     "request_bytes", "response_bytes", "latency_ns")
            for name, value in zip(names, values):
                if type(value) is not int or not 0 <= value <= _MAX_I64:
                    raise ValueError(f"{name}={value!r} is not an integer in 0..2**63-1")
        for name, value, lo, hi in (("api_key", self.api_key, 0, 0x7FFF),
                                    ("api_version", self.api_version, 0, 0x7FFF),
                                    ("correlation_id", self.correlation_id, -(1 << 31), (1 << 31) - 1),
                                    ("error_code", self.error_code, -(1 << 15), (1 << 15) - 1)):
            if type(value) is not int or not lo <= value <= hi:
                raise ValueError(f"{name}={value!r} is outside {lo}..{hi}")
        if self.compression not in ("", *COMPRESSION):
            raise ValueError(f"compression={self.compression!r} is not one of {COMPRESSION}")
        for name in ("topics", "topic_ids"):
            if not isinstance(getattr(self, name), tuple):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        # Bytes that are not UTF-8 are shown as \xNN: up to 4 characters per byte kept.
        if len(self.topics) > MAX_TOPICS or len(self.topic_ids) > MAX_TOPICS \
                or len(self.client_id) > 4 * MAX_CLIENT_ID or len(self.topic) > 4 * MAX_TOPIC \
                or any(len(s) > 4 * MAX_TEXT for s in (self.group, self.error_message,
                                                      self.mechanism, self.sasl_user,
                                                      self.software)):
            raise ValueError("a KafkaEvent field is longer than its bound")


# -- detection ---------------------------------------------------------------------------------

def looks_like(first: bytes, direction: Direction) -> bool:
    """Whether the first bytes of a direction look like a Kafka request: a size of 10 bytes
    to 100 MiB, an api key Kafka defines with a version it defines, and a client id that is
    null or printable ASCII of at most MAX_CLIENT_ID bytes, all of it present. Responses carry
    only a size and a correlation id, too little to tell: they are left to the port hint."""
    if direction != _TO_SERVER or len(first) < 14:
        return False
    size = _I32.unpack_from(first)[0]
    key, version, _ = _HEAD.unpack_from(first, 4)
    api = API_VERSIONS.get(key)
    if api is None or not 0 <= version <= api[1] or not 10 <= size <= MAX_SIGNATURE_FRAME:
        return False
    n = _I16.unpack_from(first, 12)[0]
    if n == -1:
        return True
    if not 0 <= n <= MAX_CLIENT_ID or size < 10 + n or len(first) < 14 + n:
        return False
    return all(0x20 <= b < 0x7F for b in first[14:14 + n])


SIGNATURE = looks_like

# How far past API_VERSIONS a request's version may be and still tell a request side from a
# response side (newer clients than the table); a response's correlation id would have to be
# small, followed by a printable "client id", to pass.
_VERSION_SLACK = 8


def _request_like(first: bytes) -> bool | None:
    """Whether a direction's first frame is a request (None: too few bytes yet to say)."""
    if len(first) < 4:
        return None
    size = _I32.unpack_from(first)[0]
    if size < 10:
        return False
    if len(first) < 14:
        return None
    key, version, _ = _HEAD.unpack_from(first, 4)
    api = API_VERSIONS.get(key)
    if api is None or not 0 <= version <= api[1] + _VERSION_SLACK:
        return False
    n = _I16.unpack_from(first, 12)[0]
    if n == -1:
        return True
    if not 0 <= n <= MAX_CLIENT_ID or size < 10 + n:
        return False
    if len(first) < 14 + n:
        return None
    return all(0x20 <= b < 0x7F for b in first[14:14 + n])


# -- helpers -----------------------------------------------------------------------------------

def _text(raw: bytes, limit: int) -> str:
    """Bounded text of a byte string; bytes that are not UTF-8 are shown escaped."""
    raw = raw[:limit]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace")


def sasl_user(token: bytes) -> str:
    """The user a SASL PLAIN (RFC 4616: authzid NUL authcid NUL passwd) or SCRAM client-first
    message (RFC 5802: gs2 header, then n=user,r=nonce) names; "" otherwise. Only the bytes
    before the password (PLAIN) are looked at; the token is never kept."""
    if token[:3] in (b"n,,", b"y,,", b"p=") or token[:2] in (b"n,", b"y,"):
        for part in token.split(b",")[2:4]:
            if part.startswith(b"n="):
                return _text(part[2:].replace(b"=2C", b",").replace(b"=3D", b"="), MAX_TEXT)
        return ""
    first = token.find(b"\0")
    if first < 0:
        return ""
    second = token.find(b"\0", first + 1)
    if second < 0:
        return ""  # no password separator within the peek: not PLAIN
    return _text(token[first + 1:second], MAX_TEXT)


class _Txn:
    """One request being paired (mutable, private)."""

    __slots__ = ("api_key", "version", "corr", "client_id", "flex", "known", "topics",
                 "topic_ids", "partitions", "group", "records", "batches", "record_bytes",
                 "compression", "error_code", "errors", "error_message", "mechanism",
                 "sasl_user", "software", "req_bytes", "resp_bytes", "truncated", "malformed",
                 "req_ts", "resp_ts", "acks", "named", "all_topics")

    def __init__(self, ts: int, size: int) -> None:
        self.api_key = self.version = self.corr = 0
        self.client_id = ""
        self.flex = False
        self.known = False          # the api key and version are in API_VERSIONS
        self.topics: list[str] = []
        self.topic_ids: list[str] = []
        self.partitions = self.records = self.batches = self.record_bytes = 0
        self.group = self.compression = self.error_message = self.mechanism = ""
        self.sasl_user = self.software = ""
        self.error_code = self.errors = 0
        self.req_bytes = size + 4
        self.resp_bytes = 0
        self.truncated = self.malformed = False
        self.req_ts = ts
        self.resp_ts = -1
        self.acks = -1
        self.named = False          # the request named topics (response names are not added)
        self.all_topics = False     # the request asked about all topics (Metadata, OffsetFetch)

    def topic(self, raw: bytes | None, cut: bool = False) -> None:
        if raw is None:
            return
        name = _text(raw, MAX_TOPIC)
        if cut:
            self.truncated = True
        if name in self.topics:
            return
        if len(self.topics) >= MAX_TOPICS:
            self.truncated = True
            return
        self.topics.append(name)

    def topic_id(self, raw: bytes) -> None:
        if raw == _ZERO_UUID:
            return  # "no id": the name is used instead
        text = str(uuid.UUID(bytes=bytes(raw)))
        if text in self.topic_ids:
            return
        if len(self.topic_ids) >= MAX_TOPICS:
            self.truncated = True
            return
        self.topic_ids.append(text)

    def error(self, code: int) -> None:
        if code:
            self.errors += 1
            if not self.error_code:
                self.error_code = code

    def transaction(self) -> Transaction:
        latency = self.resp_ts - self.req_ts if self.resp_ts >= 0 else 0
        api = API_VERSIONS.get(self.api_key)
        return Transaction(self.req_ts, KafkaEvent(
            api_key=self.api_key, api=api[0] if api else "", api_version=self.version,
            correlation_id=self.corr, client_id=self.client_id,
            topic=self.topics[0] if self.topics else "", topics=tuple(self.topics),
            topic_ids=tuple(self.topic_ids), partitions=self.partitions, group=self.group,
            records=self.records, batches=self.batches, record_bytes=self.record_bytes,
            compression=self.compression, error_code=self.error_code,
            error=error_name(self.error_code), errors=self.errors,
            error_message=self.error_message, mechanism=self.mechanism,
            sasl_user=self.sasl_user, software=self.software, request_bytes=self.req_bytes,
            response_bytes=self.resp_bytes, truncated=self.truncated, malformed=self.malformed,
            latency_ns=latency if latency > 0 else 0,
        ))


class _Side:
    """One direction's framing state (mutable, private)."""

    __slots__ = ("buf", "first_ts", "gen", "want", "left", "skip", "msg_ts", "eof")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.first_ts = 0       # time of the first byte in buf
        self.gen = None         # the walker of the message being read, None between messages
        self.want = 0           # its request: n > 0 bytes, -n skip n, 0 a skip under way
        self.left = 0           # bytes of the message not yet handed out or skipped
        self.skip = 0           # bytes still to discard (a skip request, or a message's tail)
        self.msg_ts = 0
        self.eof = False


# -- the parser --------------------------------------------------------------------------------

class KafkaParser:
    """Kafka for one TCP connection. See the module docstring for the rules."""

    name = APP_PROTO

    def __init__(self, *, max_pending: int = MAX_PENDING) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        self.state = _OK
        self.error = ""
        self.max_pending = max_pending
        self.transactions = 0
        self.unknown_apis = 0         # requests with an api key not in API_VERSIONS
        self.unknown_versions = 0     # known api key, version newer than API_VERSIONS lists
        self.unmatched = 0            # responses whose request was not seen (capture began late)
        self.evicted = 0              # requests reported early because too many were waiting
        self.malformed = 0            # message bodies that did not follow their layout
        self.sasl_tokens = 0          # raw SASL frames after SaslHandshake v0, skipped unread
        self._sides = (_Side(), _Side())
        self._pending: OrderedDict[int, _Txn] = OrderedDict()
        self._out: deque[Transaction] = deque()
        self._raw_sasl = False        # a SaslHandshake v0 succeeded: raw tokens follow
        self._raw_replies = 0         # raw tokens sent, whose raw answers are to come
        self._client_id = ""
        self._topic = ""
        self._swap: int | None = None   # None until the roles are known (see _hold)
        self._held: list[tuple[int, bytes, int]] = []

    # -- the L7Parser contract -------------------------------------------------------------

    def receive_data(self, direction: Direction, data: bytes, ts_ns: int) -> None:
        if self.state is not _OK or not data:
            return
        if self._swap is None:
            self._hold(int(direction), data, ts_ns)
            return
        self._data(int(direction) ^ self._swap, data, ts_ns)

    def _hold(self, d: int, data: bytes, ts_ns: int) -> None:
        """Before the roles are known: keep the bytes until one side's first frame says
        whether it is a request (a capture that began mid-connection may show the broker
        first, and the engine then takes the broker for the initiator)."""
        self._held.append((d, data, ts_ns))
        first = b"".join(x for side, x, _ in self._held if side == d)[:14 + MAX_CLIENT_ID]
        verdict = _request_like(first)
        if verdict is not None:
            self._decide(d if verdict else d ^ 1)

    def _decide(self, requester: int) -> None:
        self._swap = requester   # 0: the initiator sends the requests
        held = self._held
        self._held = []
        for d, data, ts in held:
            if self.state is _OK:
                self._data(d ^ requester, data, ts)

    def _data(self, d: int, data: bytes, ts_ns: int) -> None:
        s = self._sides[d]
        if s.eof:
            return
        if s.skip:
            if len(data) < s.skip:
                s.skip -= len(data)
                return
            data = data[s.skip:]
            s.skip = 0
        if not s.buf:
            s.first_ts = ts_ns
        s.buf += data
        self._pump(d, s, ts_ns)

    def receive_datagram(self, direction: Direction, data: bytes, ts_ns: int) -> None:
        self._fail("Kafka runs over a stream, got a datagram")

    def receive_gap(self, direction: Direction, length: int, ts_ns: int) -> None:
        self._lost(self._side_of(direction), length, ts_ns, "gap")

    def receive_skip(self, direction: Direction, length: int, ts_ns: int) -> None:
        self._lost(self._side_of(direction), length, ts_ns, "skip")

    def _side_of(self, direction: Direction) -> int:
        """Which side (0 requests, 1 responses) a direction is; decides the roles, as they
        stand, when the bytes seen so far could not."""
        if self._swap is None:
            self._decide(0)
        return int(direction) ^ self._swap

    def receive_eof(self, direction: Direction, ts_ns: int) -> None:
        if self.state is not _OK:
            return
        d = self._side_of(direction)
        s = self._sides[d]
        if self.state is not _OK or s.eof:
            return
        s.eof = True
        s.buf.clear()
        s.skip = 0
        if s.gen is not None:
            s.gen.close()   # a message cut by the end of the stream: not a request sent
            s.gen = None
        if d == _TO_CLIENT:
            self._flush()   # no response can come any more
        if self._sides[0].eof and self._sides[1].eof:
            self._flush()
            self.state = _DONE

    def skip_hint(self, direction: Direction) -> int:
        if self.state is not _OK or self._swap is None:
            return 0
        return self._sides[int(direction) ^ self._swap].skip

    def next_event(self) -> Transaction | _NeedData:
        return self._out.popleft() if self._out else NEED_DATA

    def summary(self) -> dict[str, str]:
        out = {}
        if self._client_id:
            out["kafka_client_id"] = self._client_id
        if self._topic:
            out["kafka_topic"] = self._topic
        return out

    # -- framing -----------------------------------------------------------------------------

    def _pump(self, d: int, s: _Side, ts_ns: int) -> None:
        """Hand the buffered bytes to the message walkers as far as they go."""
        buf = s.buf
        pos = 0
        try:
            while True:
                gen = s.gen
                if gen is None:
                    if s.skip or len(buf) - pos < 4:
                        break
                    size = _I32.unpack_from(buf, pos)[0]
                    raw = self._raw_replies if d else self._raw_sasl
                    if not (0 if raw else 4 if d else 8) <= size <= MAX_FRAME:
                        raise _Malformed(f"message size {size} out of range")
                    s.msg_ts = s.first_ts if pos == 0 else ts_ns
                    pos += 4
                    s.left = size
                    if d and raw:
                        self._raw_replies -= 1   # the answer to a raw SASL token: unread
                        pos = self._end(s, pos)
                        continue
                    s.gen = gen = (self._walk_response if d else self._walk_request)(size, s.msg_ts)
                    value = next(gen, None)
                else:
                    want = s.want
                    avail = len(buf) - pos
                    if want > 0:
                        left = s.left
                        if want > left:
                            value = _throw(gen)
                        elif avail < want:
                            break
                        else:
                            # Reads that fit in the message and in the buffer are fed in
                            # this loop; anything else goes back through the checks above.
                            # (Most fields are a few bytes: this is the parser's hot path.)
                            send = gen.send
                            end = len(buf)
                            while True:
                                chunk = buf[pos:pos + want]
                                pos += want
                                left -= want
                                s.left = left   # walkers check counts against it
                                try:
                                    value = send(chunk)
                                except StopIteration:
                                    value = None
                                    break
                                if value is None or not 0 < value <= left \
                                        or end - pos < value:
                                    break
                                want = value
                    elif want < 0:
                        n = -want
                        if n > s.left:
                            value = _throw(gen)
                        else:
                            s.left -= n
                            take = n if n < avail else avail
                            pos += take
                            s.skip = n - take
                            s.want = 0
                            if s.skip:
                                break
                            value = _send(gen, None)
                    elif s.skip:
                        break
                    else:
                        value = _send(gen, None)
                if value is None:
                    pos = self._end(s, pos)
                else:
                    s.want = value
        except (_Malformed, _BadBody) as exc:
            self._fail(str(exc))
            return
        self._compact(s, pos, ts_ns)

    def _compact(self, s: _Side, pos: int, ts_ns: int) -> None:
        if pos:
            del s.buf[:pos]
            # What is left began in the segment just received (see _pump: a walker only
            # waits for bytes of its own message, so older bytes were all consumed).
            s.first_ts = ts_ns

    def _end(self, s: _Side, pos: int) -> int:
        """The walker is done with its message: skip the message's unread tail."""
        if s.gen is not None:
            s.gen.close()
            s.gen = None
        s.want = 0
        left = s.left
        s.left = 0
        if left:
            avail = len(s.buf) - pos
            take = left if left < avail else avail
            pos += take
            s.skip = left - take
        return pos

    def _lost(self, d: int, length: int, ts_ns: int, what: str) -> None:
        s = self._sides[d]
        if self.state is not _OK or length <= 0 or s.eof:
            return
        if length <= s.skip and not s.buf:
            s.skip -= length    # inside a record payload or an unread tail: costs nothing
            if not s.skip:
                self._pump(d, s, ts_ns)
            return
        self._fail(f"{what} of {length} bytes outside a skipped Kafka field")

    def _fail(self, reason: str) -> None:
        if self.state is not _OK:
            return
        self._flush()   # what was seen before the framing broke is still reported
        self.state = _ERROR
        self.error = reason
        for s in self._sides:
            s.buf.clear()
            if s.gen is not None:
                s.gen.close()
                s.gen = None

    def _flush(self) -> None:
        while self._pending:
            self._emit(self._pending.popitem(last=False)[1])

    def _emit(self, txn: _Txn) -> None:
        self._out.append(txn.transaction())
        self.transactions += 1

    # -- field readers (generators: yield n for n bytes, -n to skip n) -----------------------

    def _uvarint(self, first: int = -1):
        """An unsigned varint. `first`: its first byte, already read by a caller that
        handles the one-byte case itself (lengths, counts and tags are nearly always below
        128; that saves a generator per field on the hot path, bench_kafka)."""
        value = shift = 0
        for _ in range(_MAX_VARINT_BYTES):
            if first < 0:
                b = (yield 1)[0]
            else:
                b, first = first, -1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
            shift += 7
        raise _BadBody("varint longer than 5 bytes")

    def _length(self, flex: bool, wide: bool = False):
        """A string's (wide: a bytes' or array's) length; -1 is null."""
        if flex:
            n = (yield 1)[0]
            n = (n if n < 0x80 else (yield from self._uvarint(n))) - 1
        elif wide:
            n = _I32.unpack((yield 4))[0]
        else:
            n = _I16.unpack((yield 2))[0]
        if n < -1:
            raise _BadBody(f"negative length {n}")
        return n

    def _string(self, flex: bool, keep: int = MAX_TEXT):
        """(raw bytes, cut) of a string, at most `keep` bytes kept; (None, False) for null."""
        n = yield from self._length(flex)
        if n < 0:
            return None, False
        if n <= keep:
            return ((yield n) if n else b""), False
        raw = yield keep
        yield -(n - keep)
        return raw, True

    def _skip_string(self, flex: bool):
        n = yield from self._length(flex)
        if n > 0:
            yield -n

    def _array(self, flex: bool, s: _Side):
        """An array's element count (-1 null), checked against the bytes left."""
        n = yield from self._length(flex, wide=True)
        if n > s.left:
            raise _BadBody(f"array of {n} elements in {s.left} bytes")
        return n

    def _skip_ints(self, flex: bool, s: _Side, width: int):
        n = yield from self._array(flex, s)
        if n > 0:
            yield -(n * width)

    def _tags(self, flex: bool, s: _Side):
        """A tagged-field section (KIP-482): count, then tag, size, value each; skipped."""
        if not flex:
            return
        n = (yield 1)[0]
        if n >= 0x80:
            n = yield from self._uvarint(n)
        if n > s.left:
            raise _BadBody(f"{n} tagged fields in {s.left} bytes")
        for _ in range(n):
            yield from self._uvarint()
            size = yield from self._uvarint()
            if size:
                yield -size

    def _topic_name(self, t: _Txn, flex: bool, response: bool = False):
        raw, cut = yield from self._string(flex, MAX_TOPIC)
        if not response or t.all_topics or not t.named:
            t.topic(raw, cut)
            if not response and raw is not None:
                t.named = True

    def _topic_uuid(self, t: _Txn, response: bool = False):
        raw = yield 16
        if not response or t.all_topics or not t.named:
            t.topic_id(raw)
            if not response and raw != _ZERO_UUID:
                t.named = True

    def _records(self, t: _Txn, flex: bool):
        """A records field: count batches and records from their headers, skip the rest."""
        n = yield from self._length(flex, wide=True)
        if n <= 0:
            return
        t.record_bytes += n
        left = n
        # Every batch starts: base offset (8), length (4), then a leader epoch (v2) or a CRC
        # (legacy) (4), then the magic byte; a batch cut by the end of the field (a Fetch
        # response stops at its size limit) is skipped uncounted.
        while left >= 17:
            head = yield 17
            left -= 17
            size = _I32.unpack_from(head, 8)[0]
            magic = head[16]
            rest = size - 5
            if rest < 1 or rest > left or magic > 2:
                break
            if magic == 2 and rest >= 44:
                # crc 4, attributes 2, last offset delta 4, timestamps 16, producer id 8,
                # producer epoch 2, base sequence 4, record count 4
                tail = yield 44
                attrs = tail[5] | tail[4] << 8
                count = _I32.unpack_from(tail, 40)[0]
                if not attrs & 0x20 and count > 0:   # control batches hold no user records
                    t.records += count
                codec = attrs & 7
                rest -= 44
            else:
                codec = (yield 1)[0] & 7          # legacy message: attributes
                t.records += 1
                rest -= 1
            t.batches += 1
            if not t.compression:
                t.compression = COMPRESSION[codec] if codec < len(COMPRESSION) else ""
            left -= size - 5
            if rest:
                yield -rest
        if left:
            yield -left

    # -- requests ----------------------------------------------------------------------------

    def _walk_request(self, size: int, ts: int):
        s = self._sides[0]
        if self._raw_sasl and size < 4:
            self.sasl_tokens += 1
            self._raw_replies += 1
            return
        head = yield 4
        key, version = struct.unpack(">hh", head)
        if self._raw_sasl:
            api = API_VERSIONS.get(key)
            if api is None or not 0 <= version <= api[1]:
                # A raw SASL token (KIP-43, after SaslHandshake v0): skipped unread.
                self.sasl_tokens += 1
                self._raw_replies += 1
                return
            self._raw_sasl = False
        if size < 8:
            raise _Malformed(f"request of {size} bytes is shorter than its header")
        if key < 0 or version < 0:
            raise _Malformed(f"api key {key} version {version} is negative")
        t = _Txn(ts, size)
        t.api_key, t.version = key, version
        t.corr = _I32.unpack((yield 4))[0]
        api = API_VERSIONS.get(key)
        if api is None:
            self.unknown_apis += 1
        elif version > api[1]:
            self.unknown_versions += 1
        else:
            t.known = True
            t.flex = 0 <= api[2] <= version
        if not (key == 7 and version == 0):   # ControlledShutdown v0 keeps header v0
            raw, cut = yield from self._string(False, MAX_CLIENT_ID)
            if raw is not None:
                t.client_id = _text(raw, MAX_CLIENT_ID)
                t.truncated = cut
                if not self._client_id:
                    self._client_id = t.client_id
        if t.known:
            try:
                yield from self._tags(t.flex, s)
                walk = _REQUESTS.get(key)
                if walk is not None:
                    yield from walk(self, t, version, t.flex, s)
            except _BadBody:
                t.malformed = True
                self.malformed += 1
        if t.topics and not self._topic:
            self._topic = t.topics[0]
        if key == 0 and t.acks == 0:
            self._emit(t)   # acks=0: the broker sends no response
            return
        pending = self._pending
        old = pending.pop(t.corr, None)
        if old is not None:
            self._emit(old)   # a correlation id reused before its response: report the first
        if len(pending) >= self.max_pending:
            self._emit(pending.popitem(last=False)[1])
            self.evicted += 1
        pending[t.corr] = t

    def _req_produce(self, t: _Txn, v: int, flex: bool, s: _Side):
        if v >= 3:
            yield from self._skip_string(flex)            # transactional id
        t.acks = _I16.unpack_from((yield 6))[0]            # acks, timeout
        for _ in range((yield from self._array(flex, s))):
            if v >= 13:
                yield from self._topic_uuid(t)
            else:
                yield from self._topic_name(t, flex)
            for _ in range((yield from self._array(flex, s))):
                yield -4                                   # partition index
                t.partitions += 1
                yield from self._records(t, flex)
                yield from self._tags(flex, s)
            yield from self._tags(flex, s)

    def _req_fetch(self, t: _Txn, v: int, flex: bool, s: _Side):
        # replica id (v0-14), max wait, min bytes, max bytes (v3+), isolation (v4+),
        # session id and epoch (v7+)
        yield -((4 if v <= 14 else 0) + 8 + (4 if v >= 3 else 0) + (1 if v >= 4 else 0)
                + (8 if v >= 7 else 0))
        per_partition = (4 + (4 if v >= 9 else 0) + 8 + (4 if v >= 12 else 0)
                         + (8 if v >= 5 else 0) + 4)
        for _ in range((yield from self._array(flex, s))):
            if v >= 13:
                yield from self._topic_uuid(t)
            else:
                yield from self._topic_name(t, flex)
            for _ in range((yield from self._array(flex, s))):
                yield -per_partition
                t.partitions += 1
                yield from self._tags(flex, s)
            yield from self._tags(flex, s)

    def _req_list_offsets(self, t: _Txn, v: int, flex: bool, s: _Side):
        yield -(4 + (1 if v >= 2 else 0))                 # replica id, isolation level
        per_partition = 4 + (4 if v >= 4 else 0) + 8 + (4 if v == 0 else 0)
        for _ in range((yield from self._array(flex, s))):
            yield from self._topic_name(t, flex)
            for _ in range((yield from self._array(flex, s))):
                yield -per_partition
                t.partitions += 1
                yield from self._tags(flex, s)
            yield from self._tags(flex, s)

    def _req_metadata(self, t: _Txn, v: int, flex: bool, s: _Side):
        n = yield from self._array(flex, s)
        if n < 0 or (n == 0 and v == 0):
            t.all_topics = True     # null (v1+), or empty in v0: every topic
        for _ in range(n):
            if v >= 10:
                yield from self._topic_uuid(t)
            yield from self._topic_name(t, flex)
            yield from self._tags(flex, s)

    def _req_offset_commit(self, t: _Txn, v: int, flex: bool, s: _Side):
        yield from self._group(t, flex)
        if v >= 1:
            yield -4                                       # generation id
            yield from self._skip_string(flex)             # member id
        if v >= 7:
            yield from self._skip_string(flex)             # group instance id
        if 2 <= v <= 4:
            yield -8                                       # retention time
        fixed = 4 + 8 + (4 if v >= 6 else 0) + (8 if v == 1 else 0)
        for _ in range((yield from self._array(flex, s))):
            if v >= 10:
                yield from self._topic_uuid(t)
            else:
                yield from self._topic_name(t, flex)
            for _ in range((yield from self._array(flex, s))):
                yield -fixed
                yield from self._skip_string(flex)         # committed metadata
                t.partitions += 1
                yield from self._tags(flex, s)
            yield from self._tags(flex, s)

    def _req_offset_fetch(self, t: _Txn, v: int, flex: bool, s: _Side):
        if v <= 7:
            yield from self._group(t, flex)
            yield from self._fetch_topics(t, v, flex, s)
            return
        for i in range((yield from self._array(flex, s))):
            if i == 0:
                yield from self._group(t, flex)
            else:
                yield from self._skip_string(flex)
            if v >= 9:
                yield from self._skip_string(flex)         # member id
                yield -4                                   # member epoch
            yield from self._fetch_topics(t, v, flex, s)
            yield from self._tags(flex, s)

    def _fetch_topics(self, t: _Txn, v: int, flex: bool, s: _Side):
        n = yield from self._array(flex, s)
        if n < 0:
            t.all_topics = True     # null: every committed offset of the group
        for _ in range(n):
            if v >= 10:
                yield from self._topic_uuid(t)
            else:
                yield from self._topic_name(t, flex)
            k = yield from self._array(flex, s)
            if k > 0:
                t.partitions += k
                yield -(4 * k)
            yield from self._tags(flex, s)

    def _group(self, t: _Txn, flex: bool):
        raw, cut = yield from self._string(flex)
        if raw is not None:
            t.group = _text(raw, MAX_TEXT)
            t.truncated = t.truncated or cut

    def _req_find_coordinator(self, t: _Txn, v: int, flex: bool, s: _Side):
        if v <= 3:
            yield from self._group(t, flex)
            return
        yield -1                                           # key type
        for i in range((yield from self._array(flex, s))):
            if i:
                return
            yield from self._group(t, flex)

    def _req_group(self, t: _Txn, v: int, flex: bool, s: _Side):
        yield from self._group(t, flex)                    # JoinGroup, Heartbeat, Leave, Sync

    def _req_api_versions(self, t: _Txn, v: int, flex: bool, s: _Side):
        if v >= 3:
            name, c1 = yield from self._string(flex)
            version, c2 = yield from self._string(flex)
            t.software = _text(b"/".join(x for x in (name, version) if x), MAX_TEXT)
            t.truncated = t.truncated or c1 or c2

    def _req_sasl_handshake(self, t: _Txn, v: int, flex: bool, s: _Side):
        raw, _ = yield from self._string(flex)
        t.mechanism = _text(raw or b"", MAX_TEXT)

    def _req_sasl_authenticate(self, t: _Txn, v: int, flex: bool, s: _Side):
        n = yield from self._length(flex, wide=True)
        if n <= 0:
            return
        peek = n if n < MAX_SASL_PEEK else MAX_SASL_PEEK
        # Only the start is read, for the user name; the secret after it is skipped unread.
        t.sasl_user = sasl_user((yield peek))
        if n > peek:
            yield -(n - peek)

    # -- responses ---------------------------------------------------------------------------

    def _walk_response(self, size: int, ts: int):
        s = self._sides[1]
        if size < 4:
            raise _Malformed(f"response of {size} bytes has no correlation id")
        corr = _I32.unpack((yield 4))[0]
        t = self._pending.pop(corr, None)
        if t is None:
            self.unmatched += 1
            return
        t.resp_ts = ts
        t.resp_bytes = size + 4
        try:
            if t.known:
                try:
                    if t.api_key != 18:          # ApiVersions answers with header v0 always
                        yield from self._tags(t.flex, s)
                    walk = _RESPONSES.get(t.api_key)
                    if walk is not None:
                        yield from walk(self, t, t.version, t.flex, s)
                except _BadBody:
                    t.malformed = True
                    self.malformed += 1
        finally:
            # Also when the response is cut by the end of the stream (close()).
            self._emit(t)

    def _resp_produce(self, t: _Txn, v: int, flex: bool, s: _Side):
        for _ in range((yield from self._array(flex, s))):
            if v >= 13:
                yield from self._topic_uuid(t, True)
            else:
                yield from self._topic_name(t, flex, True)
            for _ in range((yield from self._array(flex, s))):
                t.error(_I16.unpack_from((yield 6), 4)[0])        # index, error code
                yield -(8 + (8 if v >= 2 else 0) + (8 if v >= 5 else 0))
                if v >= 8:
                    for _ in range((yield from self._array(flex, s))):
                        yield -4                                   # batch index
                        yield from self._skip_string(flex)
                        yield from self._tags(flex, s)
                    yield from self._error_message(t, flex)
                yield from self._tags(flex, s)
            yield from self._tags(flex, s)

    def _resp_fetch(self, t: _Txn, v: int, flex: bool, s: _Side):
        if v >= 7:
            yield -4                                               # throttle time
            t.error(_I16.unpack_from((yield 6))[0])                # error code, session id
        elif v >= 1:
            yield -4
        fixed = 8 + (8 if v >= 4 else 0) + (8 if v >= 5 else 0)
        for _ in range((yield from self._array(flex, s))):
            if v >= 13:
                yield from self._topic_uuid(t, True)
            else:
                yield from self._topic_name(t, flex, True)
            for _ in range((yield from self._array(flex, s))):
                t.error(_I16.unpack_from((yield 6), 4)[0])          # partition, error code
                yield -fixed
                if v >= 4:
                    for _ in range((yield from self._array(flex, s))):
                        yield -16                                  # aborted transaction
                        yield from self._tags(flex, s)
                if v >= 11:
                    yield -4                                       # preferred read replica
                yield from self._records(t, flex)
                yield from self._tags(flex, s)
            yield from self._tags(flex, s)

    def _resp_list_offsets(self, t: _Txn, v: int, flex: bool, s: _Side):
        if v >= 2:
            yield -4
        for _ in range((yield from self._array(flex, s))):
            yield from self._topic_name(t, flex, True)
            for _ in range((yield from self._array(flex, s))):
                t.error(_I16.unpack_from((yield 6), 4)[0])
                if v == 0:
                    yield from self._skip_ints(flex, s, 8)          # old-style offsets
                else:
                    yield -(16 + (4 if v >= 4 else 0))
                yield from self._tags(flex, s)
            yield from self._tags(flex, s)

    def _resp_metadata(self, t: _Txn, v: int, flex: bool, s: _Side):
        if v >= 3:
            yield -4
        for _ in range((yield from self._array(flex, s))):         # brokers
            yield -4
            yield from self._skip_string(flex)                     # host
            yield -4
            if v >= 1:
                yield from self._skip_string(flex)                 # rack
            yield from self._tags(flex, s)
        if v >= 2:
            yield from self._skip_string(flex)                     # cluster id
        if v >= 1:
            yield -4                                               # controller id
        count_partitions = not t.partitions
        for _ in range((yield from self._array(flex, s))):
            t.error(_I16.unpack((yield 2))[0])
            yield from self._topic_name(t, flex, True)
            if v >= 10:
                yield from self._topic_uuid(t, True)
            if v >= 1:
                yield -1                                           # is internal
            for _ in range((yield from self._array(flex, s))):
                t.error(_I16.unpack_from((yield 10))[0])          # error, index, leader
                if count_partitions:
                    t.partitions += 1
                if v >= 7:
                    yield -4                                       # leader epoch
                yield from self._skip_ints(flex, s, 4)             # replicas
                yield from self._skip_ints(flex, s, 4)             # in-sync replicas
                if v >= 5:
                    yield from self._skip_ints(flex, s, 4)         # offline replicas
                yield from self._tags(flex, s)
            if v >= 8:
                yield -4                                           # authorized operations
            yield from self._tags(flex, s)
        if 8 <= v <= 10:
            yield -4
        if v >= 13:
            t.error(_I16.unpack((yield 2))[0])

    def _resp_offset_commit(self, t: _Txn, v: int, flex: bool, s: _Side):
        if v >= 3:
            yield -4
        for _ in range((yield from self._array(flex, s))):
            if v >= 10:
                yield from self._topic_uuid(t, True)
            else:
                yield from self._topic_name(t, flex, True)
            for _ in range((yield from self._array(flex, s))):
                t.error(_I16.unpack_from((yield 6), 4)[0])
                yield from self._tags(flex, s)
            yield from self._tags(flex, s)

    def _resp_offset_fetch(self, t: _Txn, v: int, flex: bool, s: _Side):
        if v >= 3:
            yield -4
        if v <= 7:
            yield from self._committed(t, v, flex, s)
            if v >= 2:
                t.error(_I16.unpack((yield 2))[0])
            return
        for _ in range((yield from self._array(flex, s))):
            yield from self._skip_string(flex)                      # group id
            yield from self._committed(t, v, flex, s)
            t.error(_I16.unpack((yield 2))[0])
            yield from self._tags(flex, s)

    def _committed(self, t: _Txn, v: int, flex: bool, s: _Side):
        count_partitions = not t.partitions
        for _ in range((yield from self._array(flex, s))):
            if v >= 10:
                yield from self._topic_uuid(t, True)
            else:
                yield from self._topic_name(t, flex, True)
            for _ in range((yield from self._array(flex, s))):
                yield -(12 + (4 if v >= 5 else 0))                 # index, offset, epoch
                yield from self._skip_string(flex)                 # metadata
                t.error(_I16.unpack((yield 2))[0])
                if count_partitions:
                    t.partitions += 1
                yield from self._tags(flex, s)
            yield from self._tags(flex, s)

    def _resp_find_coordinator(self, t: _Txn, v: int, flex: bool, s: _Side):
        if v >= 1:
            yield -4
        if v <= 3:
            t.error(_I16.unpack((yield 2))[0])
            if v >= 1:
                yield from self._error_message(t, flex)
            return
        for _ in range((yield from self._array(flex, s))):
            yield from self._skip_string(flex)                     # key
            yield -4
            yield from self._skip_string(flex)                     # host
            t.error(_I16.unpack_from((yield 6), 4)[0])              # port, error code
            yield from self._error_message(t, flex)
            yield from self._tags(flex, s)

    def _resp_top_error(self, t: _Txn, v: int, flex: bool, s: _Side):
        # JoinGroup (throttle from v2), SyncGroup, Heartbeat, LeaveGroup (from v1),
        # InitProducerId (always): [throttle time] error code, then fields not read.
        key = t.api_key
        if (key == 11 and v >= 2) or (key in (12, 13, 14) and v >= 1) or key == 22:
            yield -4
        t.error(_I16.unpack((yield 2))[0])
        if key == 13 and v >= 3:
            for _ in range((yield from self._array(flex, s))):
                yield from self._skip_string(flex)                 # member id
                yield from self._skip_string(flex)                 # group instance id
                t.error(_I16.unpack((yield 2))[0])
                yield from self._tags(flex, s)

    def _resp_first_error(self, t: _Txn, v: int, flex: bool, s: _Side):
        # ApiVersions, SaslHandshake: the error code comes first.
        t.error(_I16.unpack((yield 2))[0])

    def _resp_sasl_handshake(self, t: _Txn, v: int, flex: bool, s: _Side):
        code = _I16.unpack((yield 2))[0]
        t.error(code)
        if v == 0 and code == 0:
            self._raw_sasl = True   # raw SASL tokens follow, without Kafka headers (KIP-43)

    def _resp_sasl_authenticate(self, t: _Txn, v: int, flex: bool, s: _Side):
        t.error(_I16.unpack((yield 2))[0])
        yield from self._error_message(t, flex)
        # The server's token (SCRAM server-first/final) is not read.

    def _error_message(self, t: _Txn, flex: bool):
        raw, _ = yield from self._string(flex)
        if raw and not t.error_message:
            t.error_message = _text(raw, MAX_TEXT)


_REQUESTS = {
    0: KafkaParser._req_produce, 1: KafkaParser._req_fetch, 2: KafkaParser._req_list_offsets,
    3: KafkaParser._req_metadata, 8: KafkaParser._req_offset_commit,
    9: KafkaParser._req_offset_fetch, 10: KafkaParser._req_find_coordinator,
    11: KafkaParser._req_group, 12: KafkaParser._req_group, 13: KafkaParser._req_group,
    14: KafkaParser._req_group, 17: KafkaParser._req_sasl_handshake,
    18: KafkaParser._req_api_versions, 36: KafkaParser._req_sasl_authenticate,
}
_RESPONSES = {
    0: KafkaParser._resp_produce, 1: KafkaParser._resp_fetch,
    2: KafkaParser._resp_list_offsets, 3: KafkaParser._resp_metadata,
    8: KafkaParser._resp_offset_commit, 9: KafkaParser._resp_offset_fetch,
    10: KafkaParser._resp_find_coordinator, 11: KafkaParser._resp_top_error,
    12: KafkaParser._resp_top_error, 13: KafkaParser._resp_top_error,
    14: KafkaParser._resp_top_error, 22: KafkaParser._resp_top_error,
    17: KafkaParser._resp_sasl_handshake, 18: KafkaParser._resp_first_error,
    36: KafkaParser._resp_sasl_authenticate,
}


# -- registration (sensor/l7/registry.py) --------------------------------------------------

def table_line(d: KafkaEvent) -> list[tuple[str, str | None]]:
    from sensor.export.table import duration  # rendering only; not needed to parse

    what = f"{d.api or f'api{d.api_key}'} v{d.api_version}"
    target = ",".join(d.topics[:3]) + ("..." if len(d.topics) > 3 else "")
    target = target or d.group or d.mechanism
    out = [(f"{what} {target}".rstrip(), None)]
    if d.records:
        out.append((f"{d.records} records", None))
    out.append(("->", "dim"))
    if d.error_code:
        out.append((d.error or str(d.error_code), "red"))
    else:
        out.append(("ok" if d.response_bytes else "-", None))
    if d.latency_ns:
        out.append((duration(d.latency_ns), None))
    return out


# SUMMARY_FIELDS are the parser's summary() keys: the Flow's l7_summary map, where
# --kafka-topic matches a flow by its first topic. Priority 60: after the other TCP signatures,
# whose first bytes it would never take anyway (a known api key and version are required).
PROTOCOL = Protocol(
    name=APP_PROTO, event=KafkaEvent, parser=KafkaParser,
    tcp_ports=PORTS, signature=looks_like, priority=60, summary_keys=SUMMARY_FIELDS,
    column_types={"api_key": "u16", "api_version": "u16", "correlation_id": "i32",
                  "error_code": "i32"},
    line=table_line, style="yellow",
    filters=(
        Filter(name="kafka_topic", field="topics", match="glob_case", flow_field="kafka_topic",
               help="topic glob: 'orders.*' (matches any topic an event names)"),
    ),
)
