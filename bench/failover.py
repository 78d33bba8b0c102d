"""The stall one server failure causes in a generation, next to the compute it cannot avoid.

Starts SmolLM2-135M-Instruct on 3 spans with one spare server per span (6 `mesh serve` processes on
loopback). For histories of 16, 64 and 256 tokens it prefills, decodes a few steps, SIGKILLs the middle
server of the chain between two steps, and measures the next step: stall = that step's time minus a
normal step. Next to it: replaying that history through the lost span's blocks locally (the compute any
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


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("mesh.inference").setLevel(logging.INFO)
    source = resolve_model("smollm2")
    threads = torch.get_num_threads()
    rows = []
    with LocalSwarm("smollm2", source.num_blocks, servers=3, replicas=2) as swarm:
        with DistributedModelForCausalLM.from_pretrained("smollm2", swarm.initial_peers, route_wait=20) as model:
            client = model.client
            for history in HISTORIES:
                client.call(lambda: client.swarm.wait_for(lambda t: len(t.servers(source.model_id)) >= 6, 30))
                ids = torch.randint(100, 20000, (1, history), generator=torch.Generator().manual_seed(history))
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
                normal = statistics.median(times)
                torch.set_num_threads(swarm.threads)  # the replay compute of a server of this swarm
                span = load_span(source.path, source.config, middle.start, middle.end)
                hidden = torch.randn(1, gen.length - 1, source.config.hidden_size)
                pos = torch.arange(gen.length - 1)[None]
                with torch.no_grad():
                    span(hidden[:, :8], pos[:, :8])
                    t0 = time.perf_counter()
                    span(hidden, pos)
                    replay = time.perf_counter() - t0
                torch.set_num_threads(threads)
                stall = failed_step - normal
                bound = replay + 3 * rtt + 0.2
                rows.append((history, normal, failed_step, stall, replay, rtt, bound))
                swarm.respawn(index)
    print("\nstall of one failure (SIGKILL of the middle server of 3), SmolLM2, loopback")
    print(f"{'history':>8} {'normal ms':>10} {'failed ms':>10} {'stall ms':>9} {'replay ms':>10} {'rtt ms':>7} "
          f"{'bound ms':>9} {'ok':>4}")
    for h, normal, failed, stall, replay, rtt, bound in rows:
        print(f"{h:8d} {normal * 1e3:10.1f} {failed * 1e3:10.1f} {stall * 1e3:9.1f} {replay * 1e3:10.1f} "
              f"{rtt * 1e3:7.2f} {bound * 1e3:9.1f} {'yes' if stall <= bound else 'no':>4}")


if __name__ == "__main__":
    main()
