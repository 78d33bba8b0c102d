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
# `mesh` with its wall clock (time.time) off by argv[1] seconds, as a peer's clock may be across the internet
SKEWED_MESH = [sys.executable, "-c", "import sys, time; real, skew = time.time, float(sys.argv.pop(1)); "
               "time.time = lambda: real() + skew; from mesh.cli.main import app; app(prog_name='mesh')"]
LISTENING = re.compile(r"^mesh: listening on (\S+)$", re.M)


class MeshProcess:
    def __init__(self, args: list[str], log: Path, env: dict | None = None, netns: str | None = None,
                 clock_skew: float = 0.0, command: list[str] | None = None) -> None:
        self.args = args
        self.log = log
        self._file = open(log, "w")
        inside = ["ip", "netns", "exec", netns] if netns else []  # execs: the PID stays the program's
        command = command or ([*SKEWED_MESH, str(clock_skew)] if clock_skew else MESH)
        self.proc = subprocess.Popen([*inside, *command, *args], stdout=self._file, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        self.addr: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def ready(self) -> bool:
        """True once the server printed its address and span; raises if it exited."""
        text = self.output()
        match = LISTENING.search(text)
        if match and "mesh: serving blocks" in text:
            self.addr = match.group(1)
            return True
        if self.proc.poll() is not None:
            raise RuntimeError(f"mesh {' '.join(self.args)} exited with {self.proc.returncode}:\n{text[-3000:]}")
        return False

    async def wait_ready(self, timeout: float = 60.0) -> str:
        with trio.fail_after(timeout):
            while not self.ready():
                await trio.sleep(0.1)
        return self.addr

    def wait_ready_sync(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"mesh {' '.join(self.args)} not ready within {timeout} s")
            time.sleep(0.1)
        return self.addr

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


def serve(folder: Path | str, blocks: str, log: Path, peers: list[str] = (), *extra: str,
          clock_skew: float = 0.0, command: list[str] | None = None) -> MeshProcess:
    args = ["serve", str(folder), "--blocks", blocks, "--listen", "/ip4/127.0.0.1/tcp/0", "--new-identity",
            "--announce-period", "1", "--threads", "1", *extra]
    for p in peers:
        args += ["--initial-peers", p]
    return MeshProcess(args, log, env={"HF_HUB_OFFLINE": "1"}, clock_skew=clock_skew, command=command)


def cheating_serve(after: int, fraction: float, seed: int, *args, **kwargs) -> MeshProcess:
    """`serve`, in a process whose span perturbs its outputs (tests/cheater.py)."""
    cheat = [sys.executable, str(Path(__file__).with_name("cheater.py")), str(after), str(fraction), str(seed)]
    return serve(*args, command=cheat, **kwargs)


class MultiServe(MeshProcess):
    """One process of several servers (tests/multiserve.py): specs maps a label to (folder, blocks, quant,
    initial peer or "")."""

    def __init__(self, specs: dict[str, tuple[str, str, str, str]], log: Path) -> None:
        args = [f"{label}={'@'.join(x for x in spec if x)}" for label, spec in specs.items()]
        super().__init__(args, log, env={"HF_HUB_OFFLINE": "1"},
                         command=[sys.executable, str(Path(__file__).with_name("multiserve.py"))])
        self.addrs: dict[str, str] = {}

    def ready(self) -> bool:
        text = self.output()
        self.addrs = dict(re.findall(r"^mesh: (\S+) listening on (\S+)$", text, re.M))
        served = set(re.findall(r"^mesh: (\S+) serving blocks", text, re.M))
        if len(served) == len(self.args):
            return True
        if self.proc.poll() is not None:
            raise RuntimeError(f"multiserve exited with {self.proc.returncode}:\n{text[-3000:]}")
        return False


async def run_mesh(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    with trio.fail_after(timeout):
        return await trio.run_process([*MESH, *args], capture_stdout=True, capture_stderr=True, check=False)


async def wait_for_servers(model, n: int, timeout: float = 20.0) -> bool:
    """Until the client of `model` sees at least n ONLINE servers of it."""
    swarm = model.client.swarm
    return await swarm.wait_for(lambda t: len(t.servers(model.source.model_id)) >= n, timeout)


SPANS = ["0:10", "10:20", "20:30"]


class Pool:
    """Two servers per span; `refill()` replaces the ones a test killed."""

    def __init__(self, folder, logs) -> None:
        self.folder, self.logs = folder, logs
        self.procs = []
        self.count = 0
        self._start(SPANS[0], []).wait_ready_sync()

    @property
    def boot(self) -> str:
        """The address of a live server (tests kill servers, the first one included)."""
        return next(p.addr for p in self.procs if p.addr and p.proc.poll() is None)

    def _start(self, span: str, peers: list[str]):
        self.count += 1
        p = serve(self.folder, span, self.logs / f"server{self.count}.log", peers)
        p.span = span
        self.procs.append(p)
        return p

    def alive(self, span: str):
        return [p for p in self.procs if p.span == span and p.proc.poll() is None]

    def refill(self, per_span: int = 2) -> None:
        new = []
        peers = [p.addr for p in self.procs if p.addr and p.proc.poll() is None][:3]
        if not peers:  # every server died: start over from one
            self._start(SPANS[0], []).wait_ready_sync()
            peers = [self.boot]
        for span in SPANS:
            for _ in range(per_span - len(self.alive(span))):
                new.append(self._start(span, peers))
        for p in new:
            p.wait_ready_sync()

    def by_peer(self, peer_id: str):
        return next(p for p in self.procs if p.addr and p.peer_id == peer_id)

    def cleanup(self) -> None:
        for p in self.procs:
            p.cleanup()
