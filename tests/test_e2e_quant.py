"""A chain of nf4 and int8 SmolLM2 servers answers sensibly and is never accused; an exact-only client
refuses it."""

from __future__ import annotations

import pytest

import torch

from mesh import DistributedModelForCausalLM
from mesh.cli.chat import Conversation
from mesh.model.errors import MeshError
from mesh.model.span import load_span

from procs import serve, wait_for_servers

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

QUANTS = {"0:10": "int8", "10:20": "nf4", "20:30": "int8"}  # one chain holds both kinds


@pytest.fixture(scope="module")
def local_blocks(smollm2):
    return load_span(smollm2.path, smollm2.config, 0, 30)


@pytest.fixture
def quantized(smollm2, tmp_path):
    procs = []
    try:
        for i, (span, quant) in enumerate(QUANTS.items()):
            procs.append(serve("smollm2", span, tmp_path / f"s{i}.log", [p.addr for p in procs[:1]], "--quant", quant))
            if i == 0:
                procs[0].wait_ready_sync(180)
        for p in procs[1:]:
            p.wait_ready_sync(180)
        yield procs[0].addr
    finally:
        for p in procs:
            p.cleanup()


def test_quantized_swarm_answers_a_factual_question(quantized, local_blocks):
    """The answer is right; and every step is spot-checked against the client's own float32 blocks (its
    local shadow): 78 positions (a 48-token prompt and 30 decode steps) × 3 hops, two int8 and one nf4,
    compared with each kind's tolerance, none accused."""
    with DistributedModelForCausalLM.from_pretrained("smollm2", [quantized], verify=1.0) as model:
        assert model.client.call(lambda: wait_for_servers(model, 3))
        infos = model.client.swarm.table.servers(model.source.model_id)
        assert {f"{i.start}:{i.end}": i.quant for i in infos} == QUANTS
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
        DistributedModelForCausalLM.from_pretrained("smollm2", [quantized], exact=True, timeout=1)
