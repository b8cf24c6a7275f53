"""A process's file descriptor -> the TCP connection behind it, through /proc only.

/proc/PID/fd/FD names the socket's inode ("socket:[INODE]"); /proc/PID/net/tcp and tcp6
list that process's network namespace's TCP sockets with their inodes, addresses and
states (the files are per namespace, so a container's sockets are found through one of
its processes). Nothing is read from the kernel's structs (DESIGN.md).

Tables are cached per namespace (the inode of /proc/PID/ns/net) and read again when an
inode is not in them: a new connection appears in the table the moment it exists, so
one re-read finds it. The cache is bounded (MAX_NETNS) and old tables go first.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

# Namespaces whose tables are kept at once: each holds one host's or container's sockets;
# a host with more containers than this re-reads tables, nothing is lost.
MAX_NETNS = 64
_LISTEN = 0x0A
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One TCP connection as its owner sees it."""

    version: int          # 4 or 6 (an IPv4-mapped IPv6 socket is 4, as on the wire)
    local: bytes          # 4 or 16 octets, network order
    local_port: int
    remote: bytes
    remote_port: int
    server: bool          # the local port is listened on: the peer initiated

    def text(self) -> tuple[str, str]:
        family = socket.AF_INET if self.version == 4 else socket.AF_INET6
        return socket.inet_ntop(family, self.local), socket.inet_ntop(family, self.remote)


def _addr(hexaddr: str) -> bytes:
    """/proc/net/tcp prints each 32-bit word of the address in host (little-endian) order."""
    raw = bytes.fromhex(hexaddr)
    return b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))


class _Table:
    __slots__ = ("sockets", "listening")

    def __init__(self) -> None:
        self.sockets: dict[int, tuple[bytes, int, bytes, int]] = {}
        self.listening: set[int] = set()


def _read_table(proc: Path, pid: int) -> _Table:
    table = _Table()
    for name in ("tcp", "tcp6"):
        try:
            lines = (proc / str(pid) / "net" / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10:
                continue
            la, lp = f[1].split(":")
            ra, rp = f[2].split(":")
            state = int(f[3], 16)
            if state == _LISTEN:
                table.listening.add(int(lp, 16))
                continue
            table.sockets[int(f[9])] = (_addr(la), int(lp, 16), _addr(ra), int(rp, 16))
    return table


class SocketResolver:
    """resolve(pid, fd) -> Endpoint, or None (not a TCP socket, or gone)."""

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self._proc = proc
        self._tables: OrderedDict[int, _Table] = OrderedDict()
        self.reads = 0      # table reads, for tests and metrics

    def destroy(self, pid: int, ep: Endpoint) -> str:
        """Aborts process pid's socket ep (module function destroy)."""
        return destroy(pid, ep, self._proc)

    def resolve(self, pid: int, fd: int) -> Endpoint | None:
        if fd < 0:
            return None
        base = self._proc / str(pid)
        try:
            link = os.readlink(base / "fd" / str(fd))
            netns = os.stat(base / "ns" / "net").st_ino
        except OSError:
            return None
        if not link.startswith("socket:["):
            return None
        inode = int(link[8:-1])
        table = self._tables.get(netns)
        if table is None or inode not in table.sockets:
            table = _read_table(self._proc, pid)
            self.reads += 1
            self._tables[netns] = table
            while len(self._tables) > MAX_NETNS:
                self._tables.popitem(last=False)
        self._tables.move_to_end(netns)
        entry = table.sockets.get(inode)
        if entry is None:
            return None
        local, lport, remote, rport = entry
        version = 4 if len(local) == 4 else 6
        if version == 6 and local.startswith(_V4_MAPPED) and remote.startswith(_V4_MAPPED):
            local, remote, version = local[12:], remote[12:], 4
        return Endpoint(version, local, lport, remote, rport, lport in table.listening)


def connected(sock: tuple[bytes, int, bytes, int], server: bool = False) -> Endpoint:
    """The Endpoint of a socket the kernel saw connect() (a client end) or accepted
    (server: a server end)."""
    local, lport, remote, rport = sock
    version = 4 if len(local) == 4 else 6
    if version == 6 and local.startswith(_V4_MAPPED) and remote.startswith(_V4_MAPPED):
        local, remote, version = local[12:], remote[12:], 4
    return Endpoint(version, local, lport, remote, rport, server)


# ---- ending a connection from its own host ----------------------------------------------
#
# A block verdict on a flow seen in plaintext resets both ends (sensor/enforce/enforcer.py)
# without TCP sequence numbers: the stream offsets are the TLS library's, and the wire
# stopped following the flow after its handshake. The probed process's socket is on this
# host, so its kernel is asked to abort it (sock_diag SOCK_DESTROY, as `ss -K`): the
# process's next call fails (ECONNABORTED) and the kernel sends the peer a RST with the
# numbers it keeps. Needs CONFIG_INET_DIAG_DESTROY and CAP_NET_ADMIN (and CAP_SYS_ADMIN to
# enter another network namespace); without them the caller counts the reset as skipped.

_NETLINK_SOCK_DIAG = 4
_SOCK_DESTROY = 21
_NLM_F_REQUEST, _NLM_F_ACK = 0x01, 0x04
_NLMSG_ERROR = 2
_CLONE_NEWNET = 0x40000000
_ALL_STATES = 0xFFFFFFFF
_NO_COOKIE = 0xFFFFFFFF


def _destroy_request(ep: Endpoint) -> bytes:
    """struct nlmsghdr + struct inet_diag_req_v2 for the socket's exact 4-tuple (the local
    end is the source; an IPv4-mapped socket is found by its IPv4 tuple)."""
    family = socket.AF_INET if ep.version == 4 else socket.AF_INET6
    sockid = (struct.pack("!HH", ep.local_port, ep.remote_port)
              + ep.local.ljust(16, b"\0") + ep.remote.ljust(16, b"\0")
              + struct.pack("=III", 0, _NO_COOKIE, _NO_COOKIE))
    req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, _ALL_STATES) + sockid
    return struct.pack("=IHHII", 16 + len(req), _SOCK_DESTROY, _NLM_F_REQUEST | _NLM_F_ACK,
                       1, 0) + req


def _destroy_here(request: bytes) -> int:
    """0, or the errno the kernel answered."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1.0)
        nl.sendto(request, (0, 0))
        reply = nl.recv(4096)
    if len(reply) >= 20 and struct.unpack_from("=H", reply, 4)[0] == _NLMSG_ERROR:
        return -struct.unpack_from("=i", reply, 16)[0]
    return 0


def destroy(pid: int, ep: Endpoint, proc: Path = Path("/proc")) -> str:
    """Aborts the TCP socket ep of process pid, in its network namespace. Returns "" when
    done, else why not (one line)."""
    request = _destroy_request(ep)
    try:
        theirs = os.stat(proc / str(pid) / "ns" / "net").st_ino
        ours = os.stat("/proc/thread-self/ns/net").st_ino
    except OSError as exc:
        return f"the process is gone ({exc.strerror})"
    result: list[str] = []

    def run() -> None:
        try:
            if theirs != ours:
                # setns(2) moves only this thread, which ends here: the sensor's other
                # threads stay in their namespace.
                fd = os.open(proc / str(pid) / "ns" / "net", os.O_RDONLY)
                try:
                    if _libc().setns(fd, _CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        result.append(f"entering its network namespace: {os.strerror(err)}")
                        return
                finally:
                    os.close(fd)
            err = _destroy_here(request)
            result.append(os.strerror(err) if err else "")
        except OSError as exc:
            result.append(exc.strerror or str(exc))

    t = threading.Thread(target=run, name="loupe-sock-destroy", daemon=True)
    t.start()
    t.join(5.0)
    return result[0] if result else "timed out"


def _libc():
    return ctypes.CDLL(None, use_errno=True)
