"""Swarms of quantized SmolLM2 servers answer sensibly; an exact-only client refuses them."""

from __future__ import annotations

import pytest

import torch

from mesh import DistributedModelForCausalLM
from mesh.cli.chat import Conversation
from mesh.cli.localswarm import LocalSwarm
from mesh.model.errors import MeshError
from mesh.model.span import load_span

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def local_blocks(smollm2):
    return load_span(smollm2.path, smollm2.config, 0, 30)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_swarm_answers_a_factual_question(smollm2, quant, tmp_path, local_blocks):
    """The answer is right; and every step is spot-checked against the client's own float32 blocks (its
    local shadow): 78 positions (a 48-token prompt and 30 decode steps) × 3 hops of quantized servers
    compared, none accused."""
    with LocalSwarm("smollm2", 30, servers=3, extra=["--quant", quant], log_dir=tmp_path) as swarm:
        with DistributedModelForCausalLM.from_pretrained("smollm2", swarm.initial_peers, verify=1.0) as model:
            infos = model.client.swarm.table.servers(model.source.model_id)
            assert {i.quant for i in infos} == {quant}
            conv = Conversation(model, max_length=256, system=None)
            answer, _, _ = conv.turn("What is the capital of France? Answer with one word.",
                                     dict(max_new_tokens=12), lambda _: None)
            conv.session.close()
            assert "Paris" in answer, answer

            model.local_blocks = local_blocks
            ids = torch.randint(100, 20000, (1, 48), generator=torch.Generator().manual_seed(0))
            rewinds = []
            with model.inference_session(max_length=96) as session:
                session.generator.on_rewind = rewinds.append
                model.generate(ids, max_new_tokens=30, session=session, eos_token_id=[])
                checker = session.remote.cfg.checker
                assert [s.holder for s in checker.shadows.values()] == [None] * 3  # the client's own blocks
            assert checker.checks >= 200 and not rewinds and not model.bans.convicted, checker.checks
        with pytest.raises(MeshError, match="have no server"):
            DistributedModelForCausalLM.from_pretrained("smollm2", swarm.initial_peers, exact=True, timeout=1)
