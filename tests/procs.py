"""`mesh` processes for end-to-end tests: start on loopback, wait for readiness with a deadline, kill by PID."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import trio

MESH = [sys.executable, "-m", "mesh.cli"]
LISTENING = re.compile(r"^mesh: listening on (\S+)$", re.M)


class MeshProcess:
    def __init__(self, args: list[str], log: Path, env: dict | None = None) -> None:
        self.args = args
        self.log = log
        self._file = open(log, "w")
        self.proc = subprocess.Popen([*MESH, *args], stdout=self._file, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        self.addr: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_ready(self, timeout: float = 60.0) -> str:
        with trio.fail_after(timeout):
            while True:
                match = LISTENING.search(self.output())
                if match and "mesh: serving blocks" in self.output():
                    self.addr = match.group(1)
                    return self.addr
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mesh {' '.join(self.args)} exited with {self.proc.returncode}:\n"
                                       f"{self.output()[-3000:]}")
                await trio.sleep(0.1)

    def wait_ready_sync(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = LISTENING.search(self.output())
            if match and "mesh: serving blocks" in self.output():
                self.addr = match.group(1)
                return self.addr
            if self.proc.poll() is not None:
                raise RuntimeError(f"mesh {' '.join(self.args)} exited with {self.proc.returncode}:\n"
                                   f"{self.output()[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"mesh {' '.join(self.args)} not ready within {timeout} s")

    @property
    def peer_id(self) -> str:
        assert self.addr is not None
        return self.addr.rsplit("/p2p/", 1)[1]

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    async def wait_exit(self, timeout: float) -> int:
        with trio.fail_after(timeout):
            while self.proc.poll() is None:
                await trio.sleep(0.05)
        return self.proc.returncode

    def cleanup(self) -> None:
        """Kill the whole process group, whatever state it is in."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
        self._file.close()


def serve(folder: Path | str, blocks: str, log: Path, peers: list[str] = (), *extra: str) -> MeshProcess:
    args = ["serve", str(folder), "--blocks", blocks, "--listen", "/ip4/127.0.0.1/tcp/0", "--new-identity",
            "--announce-period", "1", "--threads", "1", *extra]
    for p in peers:
        args += ["--initial-peers", p]
    return MeshProcess(args, log, env={"HF_HUB_OFFLINE": "1"})


async def run_mesh(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    with trio.fail_after(timeout):
        return await trio.run_process([*MESH, *args], capture_stdout=True, capture_stderr=True, check=False)


def elapsed_since(t0: float) -> float:
    return time.monotonic() - t0
