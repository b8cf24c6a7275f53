"""The kernel's content sniffer selects on exactly the first bytes the protocol registry
declares (Protocol.kernel_prefixes, compiled in by the loader), run in the real program."""

from __future__ import annotations

import pytest

from sensor.kernel import abi
from sensor.kernel.hybrid import SelectionConfig
from sensor.l7 import http1, registry
from tests.kernel.test_hybrid import A4, B4, loaded, rig, tcp  # noqa: F401  (fixtures)

pytestmark = pytest.mark.bpf


def test_the_http_prefixes_are_the_kernel_methods():
    words = {int.from_bytes((m + b" ")[:4], "big") for m in http1.KERNEL_METHODS}
    assert set(registry.kernel_sniff_prefixes()) == words
    assert set(http1.KERNEL_METHODS) <= http1.METHODS


@pytest.mark.parametrize("method", sorted(http1.METHODS))
def test_sniffer_selects_a_request_iff_its_method_is_registered_for_the_kernel(rig, method):
    rig.reset(SelectionConfig(ports=()))
    port = 8100 + sorted(http1.METHODS).index(method)
    rig.run(tcp(A4, B4, port, 9999, "PA", seq=5, data=method + b" /x HTTP/1.1\r\n\r\n"))
    selected = rig.flow(port)[1].l7_select
    if method in http1.KERNEL_METHODS:
        assert selected == abi.SEL_SNIFFED
    else:
        # Userspace knows it (detect finds it on a selected flow), the kernel does not look.
        assert selected == 0
