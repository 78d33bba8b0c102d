"""SmolLM2 through three `mesh serve` processes: chat memory across turns, int8 hidden states on every hop."""

from __future__ import annotations

import pytest
import torch

from mesh import DistributedModelForCausalLM
from mesh.cli.chat import Conversation
from mesh.cli.localswarm import LocalSwarm
from mesh.model.chat import encode_messages

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def swarm(smollm2, tmp_path_factory):
    with LocalSwarm("smollm2", 30, servers=3, log_dir=tmp_path_factory.mktemp("logs")) as s:
        yield s


def test_second_turn_sees_the_first(swarm, smollm2_model):
    with DistributedModelForCausalLM.from_pretrained("smollm2", swarm.initial_peers) as model:
        conv = Conversation(model, max_length=512, system=None)
        sampling = dict(max_new_tokens=24)
        first, _, _ = conv.turn("My name is Ada. Reply with one short sentence.", sampling, lambda _: None)
        fed_before = conv.session.generator.fed
        second, _, _ = conv.turn("What is my name?", sampling, lambda _: None)
        # the second turn reused the session: only the new turn's tokens were sent, not the history again
        assert conv.session.generator.fed > fed_before
        ids = encode_messages(model.tokenizer, conv.messages[:-1])
        ref = smollm2_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                     pad_token_id=model.tokenizer.pad_token_id)
        expected = model.tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
        assert second == expected
        conv.session.close()


def test_int8_on_every_hop_through_servers_keeps_greedy(swarm, smollm2_model):
    with DistributedModelForCausalLM.from_pretrained("smollm2", swarm.initial_peers, compression="int8") as model:
        ids = encode_messages(model.tokenizer, [{"role": "user", "content": "List the planets of the solar system."}])
        out = model.generate(ids, max_new_tokens=64)
        ref = smollm2_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False,
                                     pad_token_id=model.tokenizer.pad_token_id)
        assert out.tolist() == ref.tolist()
