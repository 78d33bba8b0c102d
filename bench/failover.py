"""The stall one server failure causes in a generation, next to the compute it cannot avoid.

Starts SmolLM2-135M-Instruct on 3 spans with one spare server per span (6 `mesh serve` processes on
loopback). For histories of 16, 64 and 256 tokens, five times each, it prefills, decodes a few steps,
SIGKILLs the middle server of the chain between two steps, measures the next step (stall = that step's
time minus a normal step) and respawns the victim; it prints the median and the worst stall. Next to it: replaying that history through the lost span's blocks locally (the compute any
recovery needs, with the servers' thread count), three client RTTs, and the target stall ≤ replay + 3 RTT
+ 200 ms.

    .venv/bin/python bench/failover.py
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

from mesh import DistributedModelForCausalLM
from mesh.cli.localswarm import LocalSwarm
from mesh.model.sources import resolve_model
from mesh.model.span import load_span
from mesh.net.client import ping

HISTORIES = (16, 64, 256)
DECODE = 6
KILLS = 5  # per history length


def one_kill(model, swarm, source, history: int, seed: int) -> tuple[float, float, float, tuple[int, int], int]:
    """Prefill `history` tokens, decode a few steps, SIGKILL the middle server between two steps, time the
    next step; respawn the victim. Returns (normal step s, failed step s, RTT s, lost span, length)."""
    client = model.client
    client.call(lambda: client.swarm.wait_for(lambda t: len(t.servers(source.model_id)) >= 6, 60))
    ids = torch.randint(100, 20000, (1, history), generator=torch.Generator().manual_seed(seed))
    with model.inference_session(max_length=history + 64) as session:
        times: list[float] = []
        gen = session.generator
        config = model.sampling(max_new_tokens=1, eos_token_id=[])
        gen.generate(ids, None, config)  # prefill: the history
        for _ in range(DECODE):
            t0 = time.perf_counter()
            gen.generate(torch.empty(1, 0, dtype=torch.long), None, config)
            times.append(time.perf_counter() - t0)
        middle = session.remote.route[1]
        index = swarm.kill(middle.peer_id)
        time.sleep(0.2)  # the process is gone before the next step starts
        t0 = time.perf_counter()
        gen.generate(torch.empty(1, 0, dtype=torch.long), None, config)
        failed_step = time.perf_counter() - t0
        rtt = statistics.median(client.call(ping, client.node, h.peer_id) for h in session.remote.route)
        assert session.remote.recoveries == 1
        length = gen.length
    swarm.respawn(index)
    return statistics.median(times), failed_step, rtt, (middle.start, middle.end), length


def replay_time(source, span_bounds: tuple[int, int], length: int, threads: int) -> float:
    """Seconds to run the lost span's blocks over the history locally, with a server's thread count."""
    default = torch.get_num_threads()
    torch.set_num_threads(threads)
    span = load_span(source.path, source.config, *span_bounds)
    hidden = torch.randn(1, length - 1, source.config.hidden_size)
    pos = torch.arange(length - 1)[None]
    with torch.no_grad():
        span(hidden[:, :8], pos[:, :8])
        t0 = time.perf_counter()
        span(hidden, pos)
        replay = time.perf_counter() - t0
    torch.set_num_threads(default)
    return replay


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    source = resolve_model("smollm2")
    rows = []
    with LocalSwarm("smollm2", source.num_blocks, servers=3, replicas=2) as swarm:
        with DistributedModelForCausalLM.from_pretrained("smollm2", swarm.initial_peers, route_wait=20) as model:
            for history in HISTORIES:
                stalls, normals, rtts, replays = [], [], [], []
                for k in range(KILLS):
                    normal, failed, rtt, lost, length = one_kill(model, swarm, source, history, seed=history + k)
                    stalls.append(failed - normal)
                    normals.append(normal)
                    rtts.append(rtt)
                    replays.append(replay_time(source, lost, length, swarm.threads))
                replay, rtt = statistics.median(replays), statistics.median(rtts)
                bound = replay + 3 * rtt + 0.2
                rows.append((history, statistics.median(normals), statistics.median(stalls), max(stalls), replay,
                             rtt, bound))
    print(f"\nstall of one failure (SIGKILL of the middle server of 3), SmolLM2, loopback, {KILLS} kills per history")
    print(f"{'history':>8} {'normal ms':>10} {'stall median':>13} {'stall worst':>12} {'replay ms':>10} "
          f"{'rtt ms':>7} {'bound ms':>9} {'worst within':>13}")
    for h, normal, median, worst, replay, rtt, bound in rows:
        print(f"{h:8d} {normal * 1e3:10.1f} {median * 1e3:13.1f} {worst * 1e3:12.1f} {replay * 1e3:10.1f} "
              f"{rtt * 1e3:7.2f} {bound * 1e3:9.1f} {'yes' if worst <= bound else 'no':>13}")


if __name__ == "__main__":
    main()
