"""Community ID v1 unit behaviour (the corpus baselines are in test_conformance.py)."""

from __future__ import annotations

import pytest

from sensor.flow.community_id import CommunityId, community_id, icmp_ports


def test_symmetric_for_tcp_and_paired_icmp():
    a = community_id(src="198.18.0.1", dst="198.18.0.2", protocol=6, src_port=1,
                     dst_port=2)
    b = community_id(src="198.18.0.2", dst="198.18.0.1", protocol=6, src_port=2,
                     dst_port=1)
    assert a == b and a.startswith("1:")
    req = community_id(src="fc00::1", dst="fc00::2", protocol=58, icmp_type=128,
                       icmp_code=0)
    rep = community_id(src="fc00::2", dst="fc00::1", protocol=58, icmp_type=129,
                       icmp_code=0)
    assert req == rep


def test_one_way_icmp_is_not_reordered():
    assert icmp_ports(1, 3, 1) == (3, 1, True)
    assert icmp_ports(1, 8, 0) == (8, 0, False)
    fwd = community_id(src="198.18.0.2", dst="198.18.0.1", protocol=1, icmp_type=3,
                       icmp_code=1)
    rev = community_id(src="198.18.0.1", dst="198.18.0.2", protocol=1, icmp_type=3,
                       icmp_code=1)
    assert fwd != rev


def test_seed_and_hex_output():
    kw = dict(src="198.18.0.1", dst="198.18.0.2", protocol=17, src_port=5, dst_port=53)
    assert CommunityId(seed=1).compute(**kw) != CommunityId().compute(**kw)
    hexid = CommunityId(base64_output=False).compute(**kw)
    assert len(hexid) == 2 + 40 and int(hexid[2:], 16) >= 0
    with pytest.raises(ValueError):
        CommunityId(seed=70000)
