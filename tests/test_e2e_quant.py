"""Swarms of quantized SmolLM2 servers answer sensibly; an exact-only client refuses them."""

from __future__ import annotations

import pytest

from mesh import DistributedModelForCausalLM
from mesh.cli.chat import Conversation
from mesh.cli.localswarm import LocalSwarm
from mesh.model.errors import MeshError

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_swarm_answers_a_factual_question(smollm2, quant, tmp_path):
    with LocalSwarm("smollm2", 30, servers=3, extra=["--quant", quant], log_dir=tmp_path) as swarm:
        with DistributedModelForCausalLM.from_pretrained("smollm2", swarm.initial_peers) as model:
            infos = model.client.swarm.table.servers(model.source.model_id)
            assert {i.quant for i in infos} == {quant}
            conv = Conversation(model, max_length=256, system=None)
            answer, _, _ = conv.turn("What is the capital of France? Answer with one word.",
                                     dict(max_new_tokens=12), lambda _: None)
            conv.session.close()
            assert "Paris" in answer, answer
        with pytest.raises(MeshError, match="have no server"):
            DistributedModelForCausalLM.from_pretrained("smollm2", swarm.initial_peers, exact=True, timeout=1)
