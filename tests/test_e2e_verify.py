"""Spot checks with real processes: a cheating server is caught and its lies undone, in inference and in
training. The pool serves tiny30 with two fp32 servers per third. (Honest int8 and nf4 servers checked on
every step: tests/test_e2e_quant.py.)"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM

from mesh import DistributedModelForCausalLM
from mesh.balancing.routing import Hop
from mesh.net.chain import ChainConfig
from mesh.net.inference import CHECK_LAG
from mesh.net.latency import RttTracker
from mesh.net.training import SwarmBlocks
from mesh.net.verify import caught_path, read_caught

from procs import MESH, cheating_serve, wait_for_servers
from test_e2e_training import local_grads

pytestmark = pytest.mark.e2e

NEW = 40
CHEAT_AFTER = 6  # the cheater's first lie is its 6th step: the prompt, then 5 honest tokens


@pytest.fixture(scope="module")
def reference(tiny30):
    ref = AutoModelForCausalLM.from_pretrained(str(tiny30), dtype=torch.float32).eval()
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return ids, out


def through(model, peer_id: str, start: int) -> None:
    """Route this client's blocks [start, …) over `peer_id` until it is caught (the test's choice of chain;
    checkers and referees are drawn from every server)."""
    model.accept = lambda s: s.start != start or s.peer_id == peer_id or peer_id in model.bans.convicted


@pytest.fixture(scope="module")
def cheater(pool, tiny30, tmp_path_factory):
    """A server of blocks 0:10 that lies (tests/cheater.py), beside the pool's honest ones."""
    pool.refill()
    proc = cheating_serve(CHEAT_AFTER, 1.0, 0, tiny30, "0:10", tmp_path_factory.mktemp("cheat") / "cheater.log",
                          [pool.boot])
    try:
        proc.wait_ready_sync()
        yield proc
    finally:
        proc.cleanup()


def test_cheater_is_caught_and_its_lies_undone(pool, tiny30, reference, cheater):
    ids, expected = reference
    pool.refill()
    with DistributedModelForCausalLM.from_pretrained(str(tiny30), [pool.boot], verify=0.0) as model:
        model.client.call(lambda: wait_for_servers(model, 7))
        through(model, cheater.peer_id, 0)
        lied = model.generate(ids, max_new_tokens=NEW)  # unchecked: the lies change the text
        assert lied.tolist() != expected.tolist()

    with DistributedModelForCausalLM.from_pretrained(str(tiny30), [pool.boot], verify=0.2) as model:
        model.client.call(lambda: wait_for_servers(model, 7))
        through(model, cheater.peer_id, 0)
        tokens, caught_at, rewinds = [0], [], []
        with model.inference_session(max_length=64) as session:
            session.generator.on_rewind = rewinds.append

            def on_token(_):
                tokens[0] += 1
                if cheater.peer_id in model.bans.convicted and not caught_at:
                    caught_at.append(tokens[0])

            out = model.generate(ids, max_new_tokens=NEW, session=session, on_token=on_token)
            route = [h.peer_id for h in session.remote.route]
        assert out.tolist() == expected.tolist()
        assert model.bans.convicted == {cheater.peer_id} and cheater.peer_id not in route  # honest hops checked too
        checker = session.remote.cfg.checker
        # lies start at token CHEAT_AFTER - 1; a check comes at least every max_gap steps and runs beside
        # at most CHECK_LAG steps, the next one acting on it
        bound = CHEAT_AFTER + checker.max_gap + CHECK_LAG + 2
        assert caught_at and caught_at[0] <= bound, (caught_at, bound)
        assert rewinds and min(rewinds) <= CHEAT_AFTER  # the kept tokens stop where the lies began
        assert "agrees with" in checker.caught[cheater.peer_id]  # a referee decided
    assert cheater.peer_id in read_caught(caught_path())  # recorded for `mesh status`, which marks it
    status = subprocess.run([*MESH, "status", "--json", "--initial-peers", pool.boot], capture_output=True,
                            text=True, timeout=60)
    servers = {s["peer_id"]: s for m in json.loads(status.stdout)["models"] for s in m["servers"]}
    assert "agrees with" in servers[cheater.peer_id]["caught"]
    assert sum(1 for s in servers.values() if s["caught"]) == 1


def test_training_checks_catch_a_lying_backward(pool, tiny30, cheater):
    """Every pass checked: the cheater's input gradients are caught, its blocks rerouted, and the gradients
    equal local autograd."""
    pool.refill()
    with DistributedModelForCausalLM.from_pretrained(str(tiny30), [pool.boot], verify=1.0) as model:
        client = model.client
        client.call(lambda: wait_for_servers(model, 7))
        blocks = SwarmBlocks(ChainConfig(client.node, client.swarm.table, RttTracker(client.node),
                                         model.source.model_id, 30, bans=model.bans, checker=model.new_checker()))
        g = torch.Generator().manual_seed(0)
        x, grad_out = torch.randn(2, 7, 64, generator=g), torch.randn(2, 7, 64, generator=g)
        pos = torch.arange(7).expand(2, 7)
        ref_out, ref_grad = local_grads(tiny30, x, pos, grad_out)

        async def run():
            rest = await blocks._route(10, 30)
            chains = [[Hop(cheater.peer_id, 0, 10), *rest]]
            free = blocks._route
            blocks._route = lambda a, b: _first(chains, free, a, b)
            out, done = await blocks.forward(x, pos)
            assert done.hops[0].peer_id == cheater.peer_id  # its forward is honest: it stays in the pass
            return out, (await blocks.backward(grad_out, done)).hidden

        out, grad = client.call(run)
        assert torch.allclose(out, ref_out, atol=1e-5, rtol=1e-5)
        assert torch.allclose(grad, ref_grad, atol=1e-5, rtol=1e-5)
        assert cheater.peer_id in model.bans.convicted and blocks.retries >= 1


async def _first(chains, free, start, end):
    return chains.pop() if chains else await free(start, end)
