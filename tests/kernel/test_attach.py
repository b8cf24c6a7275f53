"""Attaching the flow meter: tcx links where the kernel has them, clsact filters where it
does not (forced here with tcx=False), and what each leaves behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sensor.kernel import attach, bpfsys, loader
from tests.conftest import REPO
from tests.kernel.conftest import attached, in_netns, meter_hooks
from tests.netns import VethPair

pytestmark = pytest.mark.bpf


@pytest.fixture(scope="module")
def kernel_prog():
    prog = loader.load()
    yield prog
    prog.close()


def _hooks(pair: VethPair) -> list[str]:
    return meter_hooks(pair.b.netns, pair.b.iface)


def _tc(pair: VethPair, hook: str) -> str:
    return pair.b.run("tc", "filter", "show", "dev", pair.b.iface, hook).stdout


def test_tcx_runs_the_meter_first_and_detaches_with_the_link(kernel_prog):
    with VethPair.create("at") as pair:
        pair.wait_ready()
        with attached(pair.b.netns, pair.b.iface, kernel_prog.prog_fd) as att:
            assert att.mode == "tcx" and att.attached == ["ingress", "egress"]
            assert _hooks(pair) == ["ingress", "egress"]
            assert "loupe_flow" not in _tc(pair, "ingress")   # no clsact filter as well
            with in_netns(pair.b.netns):
                ifindex = attach.interface_index(pair.b.iface)
                ids = bpfsys.tcx_query(ifindex, bpfsys.BPF_TCX_INGRESS)
            assert [bpfsys.prog_name(i) for i in ids] == [loader.PROGRAM]
        assert att.attached == [] and att.links == {}
        assert _hooks(pair) == []


def test_tcx_link_goes_away_with_a_killed_process(kernel_prog):
    """A crash cannot leave the meter attached: the link dies with its last descriptor."""
    with VethPair.create("ak") as pair:
        pair.wait_ready()
        child = pair.b.popen(
            sys.executable, "-c",
            "import sys, time\n"
            "from sensor.kernel import attach, loader\n"
            "prog = loader.load()\n"
            "attach.attach(sys.argv[1], prog.prog_fd)\n"
            "print('attached', flush=True)\n"
            "time.sleep(60)\n", pair.b.iface,
            stdout=subprocess.PIPE, text=True, cwd=REPO)
        try:
            assert child.stdout.readline().strip() == "attached"
            assert _hooks(pair) == ["ingress", "egress"]
        finally:
            child.kill()
            child.wait()
        assert _hooks(pair) == []


def test_clsact_fallback_attaches_filters_and_removes_its_qdisc(kernel_prog):
    with VethPair.create("ac") as pair:
        pair.wait_ready()
        with attached(pair.b.netns, pair.b.iface, kernel_prog.prog_fd, tcx=False) as att:
            assert att.mode == "clsact" and att.attached == ["ingress", "egress"]
            assert "loupe_flow:ingress" in _tc(pair, "ingress")
            assert "loupe_flow:egress" in _tc(pair, "egress")
            assert _hooks(pair) == ["ingress", "egress"]
        assert _hooks(pair) == []
        assert "clsact" not in pair.b.run("tc", "qdisc", "show", "dev", pair.b.iface).stdout


def test_tcx_attach_removes_a_stale_clsact_filter_of_ours(kernel_prog):
    """A filter left by a crashed run on an older setup would count every packet twice."""
    with VethPair.create("as") as pair:
        pair.wait_ready()
        with in_netns(pair.b.netns):
            stale = attach.attach(pair.b.iface, kernel_prog.prog_fd, tcx=False)
            assert stale.mode == "clsact"
            att = attach.attach(pair.b.iface, kernel_prog.prog_fd)
        try:
            assert att.mode == "tcx"
            assert "loupe_flow" not in _tc(pair, "ingress") + _tc(pair, "egress")
            assert _hooks(pair) == ["ingress", "egress"]
        finally:
            attach.detach(att)
            stale.attached = []
            with in_netns(pair.b.netns):
                attach.detach(stale)   # the qdisc the stale run added


def test_loopback_gets_ingress_only(kernel_prog):
    with VethPair.create("al") as pair:
        pair.wait_ready()
        with in_netns(pair.b.netns):
            att = attach.attach("lo", kernel_prog.prog_fd)
            try:
                assert att.attached == ["ingress"]
                assert attach.attached_hooks("lo") == ["ingress"]
            finally:
                attach.detach(att)
            assert attach.attached_hooks("lo") == []
