"""Compiling BPF C with bcc in a short-lived child process, so the sensor itself never
maps LLVM.

Why. bcc compiles in-process with clang/LLVM: importing bcc maps libLLVM and
libclang-cpp, and compiling leaves their heap behind. In an idle live sensor that was
about half of its resident memory (docs/sensor.md, "Idle cost"); malloc_trim(0) after
compiling gives back only part of the heap, and none of the library pages. What the
sensor needs afterwards are file descriptors: programs, maps, and the perf events that
hold tracepoint attachments. The child (bccload_child.py) compiles, loads and attaches,
passes those descriptors here over a unix socket (SCM_RIGHTS) and exits; the kernel
objects live as long as this process holds them. Ring buffers are then read with libbpf
(sensor/kernel/ringbuf.py), maps with bpf(2) (sensor/kernel/bpfsys.py).

Errors come back as LoadError with the stage that failed (import, compile, load) and
bcc's own message; sensor/kernel/loader.py and tracepoints.py turn them into one line.
The verifier log bcc prints goes to our stderr, which the child shares.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

CHILD = Path(__file__).with_name("bccload_child.py")
# The reply: a small JSON text, and at most the kernel's limit of descriptors per
# message (SCM_MAX_FD). A flow meter has about twenty.
_MAX_REPLY = 1 << 16
_MAX_FDS = 253


class LoadError(Exception):
    """The child could not compile or load: stage is "import", "compile", "load" or
    "internal" (a bug in the child, or it died)."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


@dataclass(frozen=True, slots=True)
class BpfMap:
    name: str
    fd: int
    key_size: int       # as bcc compiled the C types (0 for a ring buffer)
    value_size: int


class BpfObject:
    """The descriptors of one compiled and loaded C file. close() releases them: the
    attachments first (closing a tracepoint's perf event detaches it), then programs and
    maps, which the kernel frees once nothing else holds them."""

    def __init__(self, programs: dict[str, int], maps: dict[str, BpfMap],
                 links: list[int], attach_types: dict[str, int] | None = None) -> None:
        self.programs = programs
        # programs loaded with the expected attach type asked for (load's programs)
        self.attach_types = attach_types or {}
        self.maps = maps
        self.links = links

    def prog_fd(self, name: str) -> int:
        return self.programs[name]

    def map(self, name: str) -> BpfMap:
        return self.maps[name]

    def map_fd(self, name: str) -> int:
        return self.maps[name].fd

    def close(self) -> None:
        fds = [*self.links, *self.programs.values(), *(m.fd for m in self.maps.values())]
        self.links, self.programs, self.maps = [], {}, {}
        for fd in fds:
            os.close(fd)


def load(src: Path, cflags: list[str], programs: dict[str, int],
         attach_types: dict[str, int] | None = None) -> BpfObject:
    """Compiles src with cflags in a child, loads `programs` (name -> bcc program type,
    e.g. BPF.SCHED_CLS = 3) besides what bcc loads and attaches itself (tracepoint__*),
    and returns every descriptor. Takes as long as the compile (seconds).
    attach_types: name -> an expected attach type to load with where the kernel takes
    it (else the program is loaded without; BpfObject.attach_types says which)."""
    at = attach_types or {}
    request = json.dumps({"src": str(src), "cflags": cflags,
                          "programs": [[n, t, at[n]] if n in at else [n, t]
                                       for n, t in sorted(programs.items())]})
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours:
        try:
            # -I: a child running as root takes nothing from the cwd or PYTHON* variables.
            proc = subprocess.Popen([sys.executable, "-I", str(CHILD), str(theirs.fileno()),
                                     request], pass_fds=(theirs.fileno(),),
                                    stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        received = False
        try:
            data, fds, flags, _ = socket.recv_fds(ours, _MAX_REPLY, _MAX_FDS)
            received = True
        finally:
            if not received:
                proc.kill()   # interrupted (Ctrl-C) while it compiled
            code = proc.wait()
    if not data:
        raise LoadError("internal", f"the bcc compiler process ended with status {code} "
                                    "without an answer")
    for fd in fds:
        os.set_inheritable(fd, False)   # received descriptors are inheritable by default
    reply = json.loads(data)
    if "error" in reply:
        for fd in fds:
            os.close(fd)
        raise LoadError(reply["stage"], reply["error"])
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise LoadError("internal", "the bcc compiler process passed more descriptors "
                                    f"than {_MAX_FDS}")
    return BpfObject(
        programs={name: fds[i] for name, i in reply["programs"].items()},
        maps={name: BpfMap(name, fds[i], key, value)
              for name, (i, key, value) in reply["maps"].items()},
        links=[fds[i] for i in reply["links"]],
        attach_types=reply.get("attach_types", {}))
