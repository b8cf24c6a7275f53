"""Network namespaces for end-to-end tests: two hosts joined by a veth pair, with
addresses from 198.18.0.0/15 (RFC 2544 benchmarking) and fc00::/7 (unique local) only,
optional 802.1Q and QinQ sub-interfaces, and a way to run commands inside.

    with VethPair.create("kt") as pair:      # namespaces kt<pid>a / kt<pid>b
        pair.a.run("ping", "-c1", pair.b.ip4)
        pair.add_vlan(100)                  # pair.vlans[100]: (Host a, Host b)

Names carry a caller prefix and the pid so concurrent test runs never collide; close()
(or leaving the with block) deletes the namespaces, which takes their interfaces along.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
from dataclasses import dataclass, field


def _v6(text: str) -> str:
    """The canonical spelling, as records and tools print it."""
    return str(ipaddress.IPv6Address(text))


def sh(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout)


@dataclass(frozen=True, slots=True)
class Host:
    """One end: a namespace, its interface and addresses."""

    netns: str
    iface: str
    ip4: str
    ip6: str

    def cmd(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 30
            ) -> subprocess.CompletedProcess:
        return sh(*self.cmd(*argv), check=check, timeout=timeout)

    def popen(self, *argv: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(*argv), **kwargs)

    def ifindex(self, iface: str | None = None) -> int:
        out = self.run("cat", f"/sys/class/net/{iface or self.iface}/ifindex").stdout
        return int(out)


@dataclass
class VethPair:
    prefix: str
    a: Host
    b: Host
    vlans: dict[int, tuple[Host, Host]] = field(default_factory=dict)
    qinq: dict[tuple[int, int], tuple[Host, Host]] = field(default_factory=dict)

    @classmethod
    def create(cls, prefix: str, *, subnet: int = 0) -> "VethPair":
        """Two namespaces <prefix><pid>a/b joined by veth; subnet picks 198.18.<subnet>.x."""
        tag = f"{prefix}{os.getpid() % 100000}"
        a = Host(f"{tag}a", "veth0", f"198.18.{subnet}.1", _v6(f"fc00:{subnet:x}::1"))
        b = Host(f"{tag}b", "veth0", f"198.18.{subnet}.2", _v6(f"fc00:{subnet:x}::2"))
        pair = cls(prefix=tag, a=a, b=b)
        try:
            for h in (a, b):
                sh("ip", "netns", "add", h.netns)
                h.run("ip", "link", "set", "lo", "up")
                # No duplicate address detection: addresses are usable at once, and
                # tests do not wait a second for tentative link-local addresses. No
                # router solicitations: there is no router, and one sent at link-up (then
                # every 4 s, three in all) can fall between attaching the meter and
                # starting a capture, a flow only one of the two saw.
                h.run("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
                      "net.ipv6.conf.default.accept_dad=0",
                      "net.ipv6.conf.all.router_solicitations=0",
                      "net.ipv6.conf.default.router_solicitations=0")
            sh("ip", "link", "add", f"{tag}x", "netns", a.netns, "type", "veth",
               "peer", "name", f"{tag}y", "netns", b.netns)
            a.run("ip", "link", "set", f"{tag}x", "name", a.iface)
            b.run("ip", "link", "set", f"{tag}y", "name", b.iface)
            for h in (a, b):
                pair._address(h, h.iface, h.ip4, h.ip6)
        except BaseException:
            pair.close()
            raise
        return pair

    @staticmethod
    def _address(h: Host, iface: str, ip4: str, ip6: str) -> None:
        h.run("ip", "addr", "add", f"{ip4}/24", "dev", iface)
        h.run("ip", "-6", "addr", "add", f"{ip6}/64", "dev", iface, "nodad")
        h.run("ip", "link", "set", iface, "up")

    def add_vlan(self, vid: int) -> tuple[Host, Host]:
        """An 802.1Q sub-interface on both ends, with its own 198.18.<vid>.x subnet.
        Needs a kernel with 802.1Q support (CONFIG_VLAN_8021Q); without it, send tagged
        frames with scapy instead (the flow meter tests do)."""
        ends = []
        for n, h in enumerate((self.a, self.b), start=1):
            name = f"v{vid}"
            h.run("ip", "link", "add", "link", h.iface, "name", name, "type", "vlan",
                  "id", str(vid))
            sub = Host(h.netns, name, f"198.18.{vid % 256}.{n}", _v6(f"fc00:{vid:x}::{n}"))
            self._address(sub, name, sub.ip4, sub.ip6)
            ends.append(sub)
        self.vlans[vid] = (ends[0], ends[1])
        return self.vlans[vid]

    def add_qinq(self, outer: int, inner: int) -> tuple[Host, Host]:
        """An 802.1ad outer tag with an 802.1Q tag inside it, on both ends."""
        ends = []
        for n, h in enumerate((self.a, self.b), start=1):
            o, i = f"s{outer}", f"s{outer}.{inner}"
            h.run("ip", "link", "add", "link", h.iface, "name", o, "type", "vlan",
                  "proto", "802.1ad", "id", str(outer))
            h.run("ip", "link", "set", o, "up")
            h.run("ip", "link", "add", "link", o, "name", i, "type", "vlan", "id", str(inner))
            sub = Host(h.netns, i, f"198.19.{inner % 256}.{n}",
                       _v6(f"fc00:{outer:x}:{inner:x}::{n}"))
            self._address(sub, i, sub.ip4, sub.ip6)
            ends.append(sub)
        self.qinq[(outer, inner)] = (ends[0], ends[1])
        return self.qinq[(outer, inner)]

    def wait_ready(self, a: Host | None = None, b: Host | None = None) -> None:
        """Pings b from a over IPv4 and IPv6 until both answer (at most ~3 s)."""
        a, b = a or self.a, b or self.b
        for _ in range(30):
            ok4 = a.run("ping", "-c1", "-W0.1", b.ip4, check=False).returncode == 0
            ok6 = a.run("ping", "-6", "-c1", "-W0.1", b.ip6, check=False).returncode == 0
            if ok4 and ok6:
                return
        raise RuntimeError(f"{a.netns} cannot reach {b.ip4} / {b.ip6}")

    def set_offloads(self, on: bool) -> None:
        """TSO/GSO/GRO (and checksum offload, which TSO needs) on both veth ends."""
        state = "on" if on else "off"
        for h in (self.a, self.b):
            h.run("ethtool", "-K", h.iface, "tso", state, "gso", state, "gro", state,
                  check=False)

    def close(self) -> None:
        for h in (self.a, self.b):
            sh("ip", "netns", "del", h.netns, check=False)

    def __enter__(self) -> "VethPair":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
