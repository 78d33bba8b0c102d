"""Servers behind NATs, in the network lab: relayed serving, DCUtR upgrades, relay failover.

Each test builds its own topology of network namespaces (tests/netlab.py) and runs real `mesh serve`
processes and a swarm client inside them; nothing leaves the lab's namespaces.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import netlab
from procs import MESH, MeshProcess

REASON = netlab.unavailable()
pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

LABCLIENT = Path(__file__).with_name("labclient.py")
PROMPT = [5, 17, 42, 99, 3, 64, 8, 21]
PORT = 31337


@pytest.fixture
def lab():
    with netlab.Lab() as lab:
        yield lab


@pytest.fixture(scope="module")
def expected(tiny30) -> list[int]:
    """32 greedy tokens of plain transformers on the same weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny30, dtype=torch.float32).eval()
    ids = torch.tensor([PROMPT])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                         pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


def serve(lab, host, folder, blocks: str, log: Path, peers: list[str] = ()) -> MeshProcess:
    args = ["serve", str(folder), "--blocks", blocks, "--listen", f"/ip4/{host.ip}/tcp/{PORT}", "--new-identity",
            "--announce-period", "1", "--threads", "1", "-v"]
    for p in peers:
        args += ["--initial-peers", p]
    proc = MeshProcess(args, log, env={"HF_HUB_OFFLINE": "1"}, netns=host.ns)
    lab.procs.append(proc.proc)  # the lab kills it by PID if the test fails first
    return proc


def client(lab, host, folder, peer: str, *extra: str, timeout: float = 120) -> dict:
    argv = [sys.executable, str(LABCLIENT), str(folder), "--peer", peer,
            "--prompt-ids", ",".join(map(str, PROMPT)), "--new-tokens", "32", *extra]
    proc = lab.popen(host, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def relay_of(addr: str) -> str:
    """The relay's peer id in a circuit address."""
    return addr.split("/p2p-circuit")[0].rsplit("/p2p/", 1)[1]


def test_servers_behind_nats_serve_through_relays(lab, tiny30, expected, tmp_path):
    """No inbound connection reaches the NAT'ed servers, one behind a cone NAT and one behind a symmetric
    NAT; a client behind a cone NAT generates through them (the first of them pushes to the second through
    a relay too). DCUtR upgrades the client's connection to the cone-NAT'ed server to a direct one; the
    symmetric NAT maps each destination to a new port, so there is no hole to punch and its relay stays."""
    public, home, office = lab.host("public"), lab.nat_host("home", "cone"), lab.nat_host("office", "symmetric")
    user = lab.nat_host("user", "cone")
    first = serve(lab, public, tiny30, "0:10", tmp_path / "public.log")
    boot = first.wait_ready_sync(60)
    hidden = serve(lab, home, tiny30, "10:20", tmp_path / "home.log", [boot])
    last = serve(lab, office, tiny30, "20:30", tmp_path / "office.log", [boot])
    addr = hidden.wait_ready_sync(90)
    last.wait_ready_sync(90)
    assert "/p2p-circuit/" in addr and relay_of(addr) == first.peer_id, hidden.output()[-2000:]
    assert "peers cannot dial this node" in hidden.output()

    # joins through the relay; DCUtR's first punch comes ~10 s after the relayed connection opens
    report = client(lab, user, tiny30, addr, "--runs", "2", "--direct-wait", "30", "--direct-peer", hidden.peer_id)
    first_run, last_run = report["runs"]
    assert first_run["tokens"] == expected and last_run["tokens"] == expected
    # every step reached the office server by push from the hidden one, the first of them through a relay
    steps = 2 * 32  # two runs: a prefill and 31 single-token steps each
    counters = report["counters"]
    assert counters[hidden.peer_id]["pushes_sent"] == steps and counters[hidden.peer_id]["pushes_relayed"] >= 1
    assert counters[last.peer_id]["steps_from_pushes"] == steps and counters[last.peer_id]["steps_from_clients"] == 0
    assert last_run["links"][hidden.peer_id] == "direct", report
    assert {r["links"].get(last.peer_id) for r in report["runs"]} == {"relayed"}, report

    status = subprocess.run(["ip", "netns", "exec", user.ns, *MESH, "status", "--json", "--initial-peers", boot],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr[-2000:]
    servers = {s["peer_id"]: s for s in json.loads(status.stdout)["models"][0]["servers"]}
    assert servers[hidden.peer_id]["relayed"] is True and servers[last.peer_id]["relayed"] is True
    assert servers[first.peer_id]["relayed"] is False


# docs/architecture.md states these bounds: a relay whose connections close is replaced within 5 s,
# one that goes silent within 15 s (two missed pings)
RELAY_RECOVERY_S = {"sigkill": 5.0, "unplugged": 15.0}


def test_relays_die_and_the_server_moves_to_another_each_time(lab, tiny30, expected, tmp_path):
    """The NAT'ed server's relay dies twice: first by SIGKILL (its connections close), then the relay it
    moved to is unplugged (silence). Each time, within RELAY_RECOVERY_S, the server holds a slot on
    another relay, announces it, and a new client generates through it."""
    relays = [lab.host(f"r{i}") for i in range(3)]
    home, user = lab.nat_host("home", "symmetric"), lab.host("user")
    servers = [serve(lab, relays[0], tiny30, "0:15", tmp_path / "r0.log")]
    boot = servers[0].wait_ready_sync(60)
    servers += [serve(lab, host, tiny30, "0:15", tmp_path / f"r{i}.log", [boot]) for i, host in enumerate(relays)
                if i > 0]
    for s in servers[1:]:
        s.wait_ready_sync(60)
    hidden = serve(lab, home, tiny30, "15:30", tmp_path / "home.log", [s.addr for s in servers])
    addr = hidden.wait_ready_sync(90)
    alive = {s.peer_id: (s, host) for s, host in zip(servers, relays)}
    current = relay_of(addr)

    for death in ("sigkill", "unplugged"):
        dead, host = alive.pop(current)
        seen = hidden.output().count("reachable through relay")
        if death == "sigkill":
            dead.signal(signal.SIGKILL)
        else:
            lab.down(host)
        killed = time.monotonic()
        recovered = None
        while time.monotonic() - killed < RELAY_RECOVERY_S[death] + 20:
            moves = re.findall(r"reachable through relay (\w+)", hidden.output())[seen:]
            if moves:
                recovered = time.monotonic() - killed
                current = next(p for p in alive if p.endswith(moves[0]))
                break
            time.sleep(0.2)
        assert recovered is not None, hidden.output()[-3000:]
        via = next(iter(alive.values()))[0]
        report = client(lab, user, tiny30, via.addr)
        reached = time.monotonic() - killed
        assert report["runs"][0]["tokens"] == expected
        assert report["runs"][0]["links"][hidden.peer_id] == "relayed"
        print(f"{death}: new relay slot {recovered:.1f} s after; a new client generated through it "
              f"{reached:.1f} s after (client start-up included)")
        assert recovered < RELAY_RECOVERY_S[death], death
