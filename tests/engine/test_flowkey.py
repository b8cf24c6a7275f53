"""Flow uids: the fast base-62 path gives exactly the digits of the plain one, and uids
stay what earlier versions produced (stored records and golden files carry them)."""

from __future__ import annotations

import random

from sensor.engine.flowkey import _UID_MOD, _base62, _base62_17, flow_uid


def test_pairwise_base62_equals_digit_by_digit():
    rng = random.Random(7)
    values = [rng.getrandbits(104) for _ in range(5000)]
    values += [0, 1, 61, 62, 3843, 3844, _UID_MOD - 1, _UID_MOD, _UID_MOD + 1,
               (1 << 104) - 1]
    for n in values:
        assert _base62_17(n) == _base62(n, 17), n


def test_uids_are_pinned():
    assert flow_uid(src="198.18.0.1", dst="198.18.0.2", src_port=40000, dst_port=80,
                    protocol=6, vlan_id=0, inner_vlan_id=0,
                    start_ns=1_700_000_000_123_456_789) == "CnZm51PsUIjdBXGMTI"
    # Symmetric, keyed by the sensor id, VLANs and start time part of the key.
    assert flow_uid(src="fc00::1", dst="fc00::2", src_port=5353, dst_port=53,
                    protocol=17, vlan_id=7, inner_vlan_id=9, start_ns=1,
                    sensor_id="s1") == "CZhowZZjf9OK9TesiL"
