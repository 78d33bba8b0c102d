"""A swarm of `mesh serve` processes on this machine (demo and benchmarks), stopped by PID on exit."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..model.errors import MeshError
from ..model.local import split_evenly

__all__ = ["LISTENING", "LocalSwarm"]

LISTENING = re.compile(r"^mesh: listening on (\S+)$", re.M)


class LocalSwarm:
    """`with LocalSwarm(model, num_blocks, servers=3) as swarm:` → `swarm.initial_peers`."""

    def __init__(self, model: str, num_blocks: int, servers: int = 3, extra: list[str] | None = None,
                 start_timeout: float = 180.0, log_dir: Path | None = None, replicas: int = 1) -> None:
        self.model = model
        self.spans = split_evenly(num_blocks, servers) * replicas  # replicas: spare servers per span
        self.extra = list(extra or [])
        self.start_timeout = start_timeout
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="mesh-swarm-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.initial_peers: list[str] = []
        # Servers on one machine split its cores; a chain computes one hop at a time, and a free core
        # keeps the network work of the other hops from slowing the one computing.
        self.threads = max(1, (os.cpu_count() or 1) // (len(self.spans) // replicas))

    def _spawn(self, index: int, peers: list[str]) -> subprocess.Popen:
        a, b = self.spans[index]
        log = self.log_dir / f"server{index}.log"
        self.logs.append(log)
        args = [sys.executable, "-m", "mesh.cli", "serve", self.model, "--blocks", f"{a}:{b}",
                "--listen", "/ip4/127.0.0.1/tcp/0", "--new-identity", "--announce-period", "1",
                "--public-name", f"local-{index}", "--threads", str(self.threads), *self.extra]
        for p in peers:
            args += ["--initial-peers", p]
        with open(log, "w") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def _wait_ready(self, index: int) -> str:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            text = self.logs[index].read_text(errors="replace")
            match = LISTENING.search(text)
            if match and "mesh: serving blocks" in text:
                return match.group(1)
            if self.procs[index].poll() is not None:
                tail = "\n".join(text.splitlines()[-5:])
                raise MeshError(f"local server {index} exited with code {self.procs[index].returncode}: {tail}")
            time.sleep(0.1)
        raise MeshError(f"local server {index} did not start within {self.start_timeout:.0f} s",
                        hint=f"see {self.logs[index]}")

    def start(self) -> "LocalSwarm":
        self._spawn(0, [])
        boot = self._wait_ready(0)
        self.initial_peers = [boot]
        for i in range(1, len(self.spans)):
            self._spawn(i, [boot])
        for i in range(1, len(self.spans)):
            self._wait_ready(i)
        return self

    def peer_id(self, index: int) -> str:
        match = LISTENING.search(self.logs[index].read_text(errors="replace"))
        return match.group(1).rsplit("/p2p/", 1)[1] if match else ""

    def kill(self, peer_id: str, sig: int = signal.SIGKILL) -> int:
        """Signal the server with this peer id; returns its index."""
        for i, proc in enumerate(self.procs):
            if proc.poll() is None and self.peer_id(i) == peer_id:
                proc.send_signal(sig)
                return i
        raise MeshError(f"no running local server has peer id {peer_id}")

    def respawn(self, index: int) -> None:
        """Start a new server for the span of (dead) server `index`."""
        live = [self.peer_addr(i) for i, p in enumerate(self.procs) if p.poll() is None]
        self.spans.append(self.spans[index])
        self._spawn(len(self.spans) - 1, live[:3])
        self._wait_ready(len(self.spans) - 1)

    def peer_addr(self, index: int) -> str:
        match = LISTENING.search(self.logs[index].read_text(errors="replace"))
        return match.group(1) if match else ""

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (drain), then SIGKILL whatever is still running."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)

    def __enter__(self) -> "LocalSwarm":
        try:
            return self.start()
        except BaseException:
            self.stop(timeout=5)
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
