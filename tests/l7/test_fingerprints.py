"""JA3, JA3S and JA4 against the published definitions and third-party expected values.

The worked example in FoxIO's technical_details/JA4.md, its edge-case table for ALPN,
and Arkime's and FoxIO's own outputs for arkime/tls-alpn-h2 are the references.
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from sensor.l7 import fingerprints as fp
from sensor.l7.tls import TlsParser
from tests.l7 import pcaputil

# The example of JA4.md ("JA4 Algorithm" .. "Raw Output"): ciphers and extensions in wire
# order, with GREASE added here (the spec says to ignore it anywhere it appears).
SPEC_CIPHERS = (0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8,
                0xC013, 0xC014, 0x009C, 0x009D, 0x002F, 0x0035)
SPEC_EXTENSIONS = (0x001B, 0x0000, 0x0033, 0x0010, 0x4469, 0x0017, 0x002D, 0x000D, 0x0005,
                   0x0023, 0x0012, 0x002B, 0xFF01, 0x000B, 0x000A, 0x0015)
SPEC_SIGALGS = (0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601)


def spec_hello(**overrides) -> fp.ClientHello:
    fields = dict(
        legacy_version=0x0303,
        ciphers=(0x2A2A,) + SPEC_CIPHERS,
        extensions=(0x0A0A,) + SPEC_EXTENSIONS + (0xFAFA,),
        has_sni=True, sni="example.com",
        alpn=(b"h2", b"http/1.1"),
        supported_versions=(0x5A5A, 0x0304, 0x0303),
        signature_algorithms=SPEC_SIGALGS,
        groups=(0x3A3A, 0x001D, 0x0017),
        point_formats=(0,),
    )
    fields.update(overrides)
    return fp.ClientHello(**fields)


def test_ja4_spec_worked_example():
    hello = spec_hello()
    assert fp.ja4(hello) == "t13d1516h2_8daaf6152771_e5627efa2ab1"
    assert fp.ja4_r(hello) == (
        "t13d1516h2_002f,0035,009c,009d,1301,1302,1303,c013,c014,c02b,c02c,c02f,c030,cca8,"
        "cca9_0005,000a,000b,000d,0012,0015,0017,001b,0023,002b,002d,0033,4469,ff01_0403,"
        "0804,0401,0503,0805,0501,0806,0601"
    )


def test_ja4_without_signature_algorithms_has_no_trailing_underscore():
    # JA4.md: "...4469,ff01 = 6d807ffa2a79" when the hello has no signature algorithms.
    hello = spec_hello(signature_algorithms=())
    assert fp.ja4(hello).endswith("_6d807ffa2a79")


def test_ja4_empty_lists_are_zeros():
    hello = fp.ClientHello(legacy_version=0x0303, ciphers=(0x0A0A,), extensions=(0x0000, 0x0010),
                           has_sni=True, alpn=(b"h2",))
    # Only GREASE ciphers: count 0 and zeros; only SNI+ALPN: counted (2) but the c list
    # is empty after removing them, so zeros as well.
    assert fp.ja4(hello) == "t12d0002h2_000000000000_000000000000"


@pytest.mark.parametrize(
    ("alpn", "expected"),
    [
        ((b"h2",), "h2"),
        ((b"http/1.1", b"h2"), "h1"),
        ((b"h",), "hh"),                 # single character: first and last
        ((), "00"),                      # no values
        ((b"",), "00"),                  # first value empty
        ((b"\xab",), "ab"),              # the five examples of JA4.md
        ((b"\xab\xcd",), "ad"),
        ((b"\x30\xab",), "3b"),
        ((b"\x30\x31\xab\xcd",), "3d"),
        ((b"\x30\xab\xcd\x31",), "01"),
    ],
)
def test_ja4_alpn_characters(alpn, expected):
    assert fp.ja4(spec_hello(alpn=alpn))[8:10] == expected


def test_ja4_no_alpn_extension():
    hello = spec_hello(alpn=(), extensions=tuple(e for e in SPEC_EXTENSIONS if e != 0x0010))
    assert fp.ja4(hello)[:10] == "t13d151500"


@pytest.mark.parametrize(
    ("legacy", "supported", "expected"),
    [
        (0x0303, (0x0304, 0x0303), "13"),
        (0x0303, (0x0303, 0x0304), "13"),   # highest, not first
        (0x0303, (0x1A1A,), "12"),          # only GREASE: as if absent
        (0x0303, (), "12"),
        (0x0302, (), "11"),
        (0x0301, (), "10"),
        (0x0300, (), "s3"),
        (0x0002, (), "s2"),
        (0xFEFD, (), "d2"),
        (0x0305, (), "00"),                 # unknown
    ],
)
def test_ja4_version(legacy, supported, expected):
    hello = spec_hello(legacy_version=legacy, supported_versions=supported)
    assert fp.ja4(hello)[1:3] == expected


def test_ja4_sni_absent_and_transport():
    hello = spec_hello(has_sni=False, sni="", extensions=tuple(e for e in SPEC_EXTENSIONS if e))
    assert fp.ja4(hello, "q").startswith("q13i1515h2_")


def test_ja4_counts_capped_at_99():
    hello = spec_hello(ciphers=tuple(range(1, 150)), extensions=tuple(range(0x100, 0x200)))
    assert fp.ja4(hello)[4:8] == "9999"


def test_grease_is_ignored_everywhere():
    plain = spec_hello(ciphers=SPEC_CIPHERS, extensions=SPEC_EXTENSIONS,
                       supported_versions=(0x0304, 0x0303), groups=(0x001D, 0x0017))
    greasy = spec_hello(signature_algorithms=(0x0A0A,) + SPEC_SIGALGS)
    assert fp.ja4(plain) == fp.ja4(greasy)
    assert fp.ja3(plain) == fp.ja3(greasy)
    assert [v for v in range(0x10000) if fp.is_grease(v)] == [
        0x0A0A + 0x1010 * i for i in range(16)
    ]


def test_ja3_string_definition():
    hello = spec_hello(extensions=(0x0A0A, 0x0000, 0x000B, 0x000A), ciphers=(0x2A2A, 0xC02B, 0x002F),
                       groups=(0x3A3A, 0x001D, 0x0017), point_formats=(0,))
    assert fp.ja3_string(hello) == "771,49195-47,0-11-10,29-23,0"
    assert fp.ja3(hello) == hashlib.md5(b"771,49195-47,0-11-10,29-23,0").hexdigest()
    # Absent lists stay as empty fields.
    bare = fp.ClientHello(legacy_version=0x0301, ciphers=(0x0005,))
    assert fp.ja3_string(bare) == "769,5,,,"


def test_ja3s_string_definition():
    hello = fp.ServerHello(legacy_version=0x0303, cipher=0xCCA9, extensions=(0, 0xFF01, 11, 16))
    assert fp.ja3s_string(hello) == "771,52393,0-65281-11-16"


def _arkime_expected(corpus):
    case = corpus / "arkime" / "tls-alpn-h2"
    body = json.loads((case / "tls-alpn-h2.test").read_text())["sessions3"][0]["body"]
    snap = (case / "ja4__insta@tls-alpn-h2.pcap.snap").read_text()
    ja4 = re.search(r"^\s+ja4: (\S+)$", snap, re.M).group(1)
    sni = re.search(r"^\s+tls_server_name: (\S+)$", snap, re.M).group(1)
    return body, ja4, sni


def test_arkime_tls_alpn_h2_fingerprints(corpus):
    """FoxIO's own JA4 snapshot and Arkime's session JSON for the same pcap blob."""
    body, snap_ja4, snap_sni = _arkime_expected(corpus)
    (flow,) = [f for f in pcaputil.flows(corpus / "arkime/tls-alpn-h2/tls-alpn-h2.pcap")
               if f.proto == 6]
    parser = TlsParser()
    (tx,) = pcaputil.feed(parser, flow)
    ev = tx.detail
    tls = body["tls"]
    assert ev.ja4 == snap_ja4 == tls["ja4"][0]
    assert fp.ja4_r(parser.client_hello) == tls["ja4_r"][0]
    assert ev.sni == snap_sni
    assert ev.ja3 == tls["ja3"][0]
    assert fp.ja3_string(parser.client_hello) == tls["ja3string"][0]
    assert ev.ja3s == tls["ja3s"][0]
    assert fp.ja3s_string(parser.server_hello) == tls["ja3sstring"][0]
    assert parser.summary() == {"tls_sni": snap_sni, "tls_ja4": snap_ja4}
