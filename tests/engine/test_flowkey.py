"""Flow uids: the fast base-62 path gives exactly the digits of the plain one, and uids
stay what earlier versions produced (stored records and golden files carry them)."""

from __future__ import annotations

import random

import pytest

from sensor.flow.flowkey import (
    _UID_MOD,
    _base62,
    _base62_17,
    _flow_uid_plain,
    _uid_text,
    flow_uid,
    flow_uid_packed,
)


def test_pairwise_base62_equals_digit_by_digit():
    rng = random.Random(7)
    values = [rng.getrandbits(104) for _ in range(5000)]
    values += [0, 1, 61, 62, 3843, 3844, _UID_MOD - 1, _UID_MOD, _UID_MOD + 1,
               (1 << 104) - 1]
    for n in values:
        assert _base62_17(n) == _base62(n, 17), n


def test_uid_digits_from_a_digest_equal_base62():
    # Compiled, _uid_text divides 32-bit limbs in C; the digits must be _base62's.
    rng = random.Random(5)
    digests = [rng.randbytes(13) for _ in range(5000)]
    digests += [bytes(13), b"\xff" * 13, b"\x80" + bytes(12), bytes(12) + b"\x01",
                (_UID_MOD - 1).to_bytes(13, "big"), _UID_MOD.to_bytes(13, "big")]
    for digest in digests:
        assert _uid_text(digest) == "C" + _base62(int.from_bytes(digest, "big"), 17), digest


def test_packed_uid_equals_keyword_uid():
    rng = random.Random(13)
    for _ in range(1000):
        width = rng.choice((4, 16))
        a, b = rng.randbytes(width), rng.randbytes(width)
        ports = rng.randrange(65536), rng.randrange(65536)
        rest = (rng.randrange(256), rng.randrange(4096), rng.randrange(4096),
                rng.getrandbits(64), rng.choice(("", "s1", "x" * 80)))
        assert flow_uid_packed(a, ports[0], b, ports[1], *rest) == flow_uid(
            src=a, dst=b, src_port=ports[0], dst_port=ports[1], protocol=rest[0],
            vlan_id=rest[1], inner_vlan_id=rest[2], start_ns=rest[3], sensor_id=rest[4])
    with pytest.raises((OverflowError, ValueError)):
        flow_uid_packed(b"\x01" * 4, 70000, b"\x02" * 4, 1, 6, 0, 0, 1, "")


def test_uids_are_pinned():
    assert flow_uid(src="198.18.0.1", dst="198.18.0.2", src_port=40000, dst_port=80,
                    protocol=6, vlan_id=0, inner_vlan_id=0,
                    start_ns=1_700_000_000_123_456_789) == "CnZm51PsUIjdBXGMTI"
    # Symmetric, keyed by the sensor id, VLANs and start time part of the key.
    assert flow_uid(src="fc00::1", dst="fc00::2", src_port=5353, dst_port=53,
                    protocol=17, vlan_id=7, inner_vlan_id=9, start_ns=1,
                    sensor_id="s1") == "CZhowZZjf9OK9TesiL"


def test_fast_uid_equals_step_by_step_definition():
    rng = random.Random(11)
    for _ in range(2000):
        width = rng.choice((4, 16))
        src, dst = rng.randbytes(width), rng.randbytes(width)
        if rng.random() < 0.1:
            dst = src   # equal addresses: ports decide the order
        args = dict(src=src, dst=dst, src_port=rng.randrange(65536),
                    dst_port=rng.randrange(65536), protocol=rng.randrange(256),
                    vlan_id=rng.randrange(4096), inner_vlan_id=rng.randrange(4096),
                    start_ns=rng.getrandbits(64), sensor_id=rng.choice(("", "s1", "x" * 80)))
        assert flow_uid(**args) == _flow_uid_plain(**args)
    # Text addresses are parsed the same way on both paths.
    assert flow_uid(src="198.18.0.1", dst=b"\xc6\x12\x00\x02", src_port=1, dst_port=2,
                    protocol=17, vlan_id=0, inner_vlan_id=0, start_ns=5) == \
        _flow_uid_plain("198.18.0.1", "198.18.0.2", 1, 2, 17, 0, 0, 5, "")


def test_out_of_range_values_still_refused():
    for bad in ({"src_port": 70000}, {"protocol": 256}, {"start_ns": -1}):
        args = dict(src="198.18.0.1", dst="198.18.0.2", src_port=1, dst_port=2,
                    protocol=6, vlan_id=0, inner_vlan_id=0, start_ns=1)
        args.update(bad)
        with pytest.raises((OverflowError, ValueError)):
            flow_uid(**args)
