"""A throwaway Debian 12 machine with systemd as PID 1, for testing the service units.

scripts/build-test-rootfs.sh builds the root filesystem once (debootstrap) into
/var/cache/loupe-test/rootfs. Each boot is `systemd-nspawn --boot --volatile=overlay`: the
root is an overlay whose upper layer is a tmpfs, so the cached tree is never written, and
the container gets its own /tmp, /run, /var and /etc. Nothing is shared with the host but
these read-only binds:

- the repository, at CHECKOUT (/srv/loupe) whatever its path on the host: a CI clone may
  live under /tmp, which the units' PrivateTmp hides. Its .venv is used through
  `install-service.sh --venv`, whose wrapper runs the venv's python (a link to
  /usr/bin/python3, which the rootfs has in the same version) with the checkout on
  PYTHONPATH, so the host paths recorded inside the venv do not matter;
- /lib/modules and /usr/src: the kernel headers bcc compiles against.

There is no tracefs inside (nspawn mounts its own /sys over any bind below it), so the
sensor unit runs with process attribution off and says so in its journal;
tests/ops/test_least_privilege.py covers attribution and tracefs on the host.

The container has a private network (only its own loopback), so services inside listen
and attach there and cannot touch the host's interfaces. It gets CAP_BPF, CAP_PERFMON
and CAP_NET_ADMIN, and the bpf/perf_event_open syscalls, which nspawn withholds by
default. Commands run inside through nsenter into the container's PID 1 (no machined on a
host whose PID 1 is not systemd, hence --register=no --keep-unit).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

ROOTFS = Path(os.environ.get("LOUPE_TEST_ROOTFS", "/var/cache/loupe-test/rootfs"))
REPO = Path(__file__).resolve().parents[2]
# Where the container sees the repository: a fixed path outside /tmp, /var/tmp, /home and
# /root, which the units' sandbox (PrivateTmp, ProtectHome) replaces with empty ones.
CHECKOUT = "/srv/loupe"
BUILD_SCRIPT = REPO / "scripts" / "build-test-rootfs.sh"


def unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn)"
    for tool in ("systemd-nspawn", "debootstrap", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} missing: apt-get install systemd-container debootstrap"
    return None


def build_rootfs() -> None:
    subprocess.run([str(BUILD_SCRIPT), str(ROOTFS)], check=True, timeout=1800,
                   capture_output=True)


class Container:
    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._proc: subprocess.Popen | None = None
        self.leader = 0

    def boot(self, timeout_s: float = 60) -> None:
        binds = [f"--bind-ro={REPO}:{CHECKOUT}", "--bind-ro=/lib/modules", "--bind-ro=/usr/src"]
        cmd = [
            "systemd-nspawn", "--quiet", f"--directory={ROOTFS}", "--volatile=overlay",
            "--boot", "--register=no", "--keep-unit", "--private-network",
            f"--machine={self.name}", "--console=read-only",
            "--capability=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN",
            "--system-call-filter=bpf perf_event_open", *binds,
        ]
        log = self.log_path.open("wb")
        # Its own session, so a signal meant for pytest's group never reaches it.
        self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited {self._proc.returncode}: "
                                   f"{self.log_path.read_text(errors='replace')[-2000:]}")
            if not self.leader:
                self.leader = self._find_leader()
            if self.leader:
                state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.3)
        raise RuntimeError(f"container did not finish booting in {timeout_s}s")

    def _find_leader(self) -> int:
        assert self._proc is not None
        children = Path(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children")
        try:
            pids = children.read_text().split()
        except OSError:
            return 0
        return int(pids[0]) if pids else 0

    def run(self, *cmd: str, check: bool = True, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", "--", *cmd],
            capture_output=True, text=True, timeout=timeout, input=input,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} -> {result.returncode}\n"
                                 f"stdout: {result.stdout}\nstderr: {result.stderr}")
        return result

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_for(self, predicate, timeout_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")

    def shutdown(self, timeout_s: float = 30) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            # SIGTERM to nspawn asks the container's systemd to power off cleanly.
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        # nspawn leaves an empty per-machine directory on the host's /run.
        propagate = Path("/run/systemd/nspawn/propagate") / self.name
        if propagate.is_dir() and not any(propagate.iterdir()):
            propagate.rmdir()
