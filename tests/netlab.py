"""A network lab: hosts in Linux network namespaces around a hub, with WAN delay and home-router NATs.

    with Lab() as lab:
        relay = lab.host("relay")                 # public: 10.77.0.1 on the hub's bridge
        home = lab.nat_host("home", "cone")        # private 10.77.1.2 behind a router 10.77.0.101
        lab.delay(25)                              # one-way ms per hub crossing (userspace, NFQUEUE)
        lab.cap(home, 50)                          # Mbit/s each way on home's uplink (tbf)
        proc = lab.popen(home, ["python", ...])    # runs inside home's namespace

Everything lives in namespaces named `<prefix>*` that the lab creates and deletes; nothing touches the
root namespace's interfaces or routes, and hosts have no route out of the lab. NAT routers are
MASQUERADE with a stateful firewall that drops unsolicited inbound traffic: "cone" keeps the source
port (endpoint-independent mapping), "symmetric" randomises it per destination (`--random-fully`).
Inside each namespace TCP uses reno: BBR's pacing at tens of ms RTT delays small messages by several ms
on its own, which would blur what the lab measures.

Needs root (namespaces, tc, iptables). `unavailable()` says why the lab cannot run here, for skips.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

NFQDELAY = Path(__file__).with_name("nfqdelay.py")
QUEUE = 0


@dataclass(frozen=True)
class LabHost:
    name: str
    ns: str
    ip: str  # the address this host has inside its namespace
    dev: str  # its interface
    public_ip: str  # what others see: ip, or the NAT router's public address
    router_ns: str | None = None
    hub_port: str = ""


def unavailable() -> str | None:
    """Why the lab cannot run on this machine, or None."""
    if os.geteuid() != 0:
        return "the network lab needs root (network namespaces, tc, iptables)"
    for tool in ("ip", "tc", "iptables"):
        if shutil.which(tool) is None:
            return f"the network lab needs `{tool}` (scripts/setup.sh installs iptables when run as root)"
    probe = f"mlprobe{os.getpid()}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"cannot create network namespaces here: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _realtime_allowed() -> bool:
    return shutil.which("chrt") is not None and subprocess.run(["chrt", "-f", "20", "true"],
                                                                capture_output=True).returncode == 0


def _remove_orphans() -> None:
    """Delete namespaces of labs whose process died without cleaning up (killed test runs)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    for name in listed:
        match = re.fullmatch(r"ml(\d+)[.-].*", name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _run(*argv: str, ns: str | None = None) -> None:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip() or done.stdout.strip()}")


class Lab:
    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or f"ml{os.getpid()}"
        self.hub = f"{self.prefix}.hub"
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self._delay: subprocess.Popen | None = None
        self._public = 0
        self._nats = 0

    def __enter__(self) -> "Lab":
        _remove_orphans()
        try:
            self._ns(self.hub)
            _run("ip", "link", "add", "br0", "type", "bridge", ns=self.hub)
            _run("ip", "link", "set", "br0", "up", ns=self.hub)
            # bridged frames go through iptables' FORWARD chain, where the delay stage hooks in
            _run("sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1", ns=self.hub)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self.namespaces.append(name)
        _run("ip", "link", "set", "lo", "up", ns=name)
        _run("sysctl", "-qw", "net.ipv4.tcp_congestion_control=reno", ns=name)

    def _port(self, ns: str, dev: str, port: str) -> None:
        _run("ip", "link", "add", dev, "netns", ns, "type", "veth", "peer", "name", port, "netns", self.hub)
        _run("ip", "link", "set", port, "master", "br0", ns=self.hub)
        _run("ip", "link", "set", port, "up", ns=self.hub)

    def host(self, name: str) -> LabHost:
        """A host with a public address on the hub."""
        self._public += 1
        ns, ip, port = f"{self.prefix}-{name}", f"10.77.0.{self._public}", f"h{self._public}"
        self._ns(ns)
        self._port(ns, "eth0", port)
        _run("ip", "addr", "add", f"{ip}/24", "dev", "eth0", ns=ns)
        _run("ip", "link", "set", "eth0", "up", ns=ns)
        return LabHost(name, ns, ip, "eth0", ip, hub_port=port)

    def nat_host(self, name: str, kind: str = "cone") -> LabHost:
        """A host on a private network behind its own NAT router; nothing can dial in."""
        if kind not in ("cone", "symmetric"):
            raise ValueError(kind)
        self._nats += 1
        k = self._nats
        router, ns = f"{self.prefix}.nat{k}", f"{self.prefix}-{name}"
        public, private = f"10.77.0.{100 + k}", f"10.77.{k}.2"
        self._ns(router)
        self._ns(ns)
        self._port(router, "pub0", f"r{k}")
        _run("ip", "addr", "add", f"{public}/24", "dev", "pub0", ns=router)
        _run("ip", "link", "set", "pub0", "up", ns=router)
        _run("ip", "link", "add", "priv0", "netns", router, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _run("ip", "addr", "add", f"10.77.{k}.1/24", "dev", "priv0", ns=router)
        _run("ip", "link", "set", "priv0", "up", ns=router)
        _run("ip", "addr", "add", f"{private}/24", "dev", "eth0", ns=ns)
        _run("ip", "link", "set", "eth0", "up", ns=ns)
        _run("ip", "route", "add", "default", "via", f"10.77.{k}.1", ns=ns)
        _run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=router)
        masq = ["iptables", "-t", "nat", "-A", "POSTROUTING", "-s", f"10.77.{k}.0/24", "-o", "pub0", "-j", "MASQUERADE"]
        _run(*masq, *(["--random-fully"] if kind == "symmetric" else []), ns=router)
        _run("iptables", "-P", "FORWARD", "DROP", ns=router)
        _run("iptables", "-A", "FORWARD", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT", ns=router)
        _run("iptables", "-A", "FORWARD", "-i", "priv0", "-o", "pub0", "-j", "ACCEPT", ns=router)
        # without this, an early inbound packet makes a conntrack entry that remaps the outbound port
        _run("iptables", "-A", "INPUT", "-i", "pub0", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT", ns=router)
        _run("iptables", "-A", "INPUT", "-i", "pub0", "-j", "DROP", ns=router)
        return LabHost(name, ns, private, "eth0", public, router_ns=router, hub_port=f"r{k}")

    def delay(self, one_way_ms: float, jitter_ms: float = 0.0, loss_pct: float = 0.0,
              links: dict[tuple[LabHost, LabHost], float] | None = None) -> None:
        """Delay every packet crossing the hub (host to host) by `one_way_ms` (± `jitter_ms`, dropping
        `loss_pct` %), or by `links[(src, dst)]` ms for the given directed links, in a real-time process."""
        if self._delay is not None:
            raise RuntimeError("the delay stage is already running")
        _run("iptables", "-A", "FORWARD", "-j", "NFQUEUE", "--queue-num", str(QUEUE), "--queue-bypass", ns=self.hub)
        argv = [sys.executable, str(NFQDELAY), "--queue", str(QUEUE), "--delay-ms", str(one_way_ms),
                "--jitter-ms", str(jitter_ms), "--loss", str(loss_pct)]
        for (src, dst), ms in (links or {}).items():
            argv += ["--rule", src.public_ip, dst.public_ip, str(ms)]
        rt = ["chrt", "-f", "20"] if _realtime_allowed() else []  # precise release times on a busy machine
        self._delay = subprocess.Popen(["ip", "netns", "exec", self.hub, *rt, *argv], stdout=subprocess.PIPE,
                                       text=True, start_new_session=True)
        line = self._delay.stdout.readline().strip()
        if line != "ready":
            self._stop_delay()
            raise RuntimeError(f"the delay stage did not start: {line!r}")

    def cap(self, host: LabHost, mbit: float) -> None:
        """Limit `host`'s link to `mbit` Mbit/s in each direction (tbf on both ends of its uplink)."""
        burst = max(16000, int(mbit * 1e6 / 8 / 250))  # 4 ms worth, at least a few packets
        edge = (host.router_ns, "pub0") if host.router_ns else (host.ns, host.dev)
        for ns, dev in (edge, (self.hub, host.hub_port)):
            _run("tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit", "burst", str(burst),
                 "latency", "200ms", ns=ns)

    def down(self, host: LabHost) -> None:
        """Unplug a host: its uplink goes down, so peers see silence rather than a refusal."""
        _run("ip", "link", "set", host.hub_port, "down", ns=self.hub)

    def popen(self, host: LabHost, argv: list[str], **kwargs) -> subprocess.Popen:
        """Run `argv` inside `host`'s namespace (the PID is the program's own: `ip netns exec` execs)."""
        proc = subprocess.Popen(["ip", "netns", "exec", host.ns, *argv], start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def rtt(self, a: LabHost, b: LabHost, count: int = 20, size: int = 1000) -> float:
        """Median round trip (s) of `size`-byte request/responses on one TCP connection from a to b."""
        server = self.popen(b, [sys.executable, "-c", _ECHO, b.ip], stdout=subprocess.PIPE, text=True)
        try:
            port = server.stdout.readline().strip()
            done = subprocess.run(["ip", "netns", "exec", a.ns, sys.executable, "-c", _PING, b.public_ip, port,
                                   str(count), str(size)], capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                raise RuntimeError(done.stderr.strip())
            return float(done.stdout)
        finally:
            server.kill()
            server.wait(timeout=10)

    def _stop_delay(self) -> None:
        if self._delay is not None and self._delay.poll() is None:
            self._delay.send_signal(signal.SIGTERM)
            try:
                self._delay.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._delay.kill()
                self._delay.wait(timeout=5)
        self._delay = None

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
        self._stop_delay()
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.namespaces.clear()


_ECHO = """
import socket, sys
s = socket.create_server((sys.argv[1], 0))
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while data := c.recv(65536):
    c.sendall(data)
"""

_PING = """
import socket, statistics, sys, time
host, port, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
c = socket.create_connection((host, port), timeout=10)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
times = []
for _ in range(count):
    t0 = time.perf_counter()
    c.sendall(bytes(size))
    got = 0
    while got < size:
        got += len(c.recv(65536))
    times.append(time.perf_counter() - t0)
print(statistics.median(times))
"""
