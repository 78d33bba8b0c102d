"""SmolLM2 through three `mesh serve` processes: chat memory across turns, int8 hidden states on every hop."""

from __future__ import annotations

import pytest
import torch

from mesh import DistributedModelForCausalLM
from mesh.cli.chat import Conversation
from mesh.model.chat import encode_messages

from conftest import assert_greedy_equal_but_near_ties

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def swarm(smol_swarm):
    return smol_swarm


def test_second_turn_sees_the_first(swarm, smollm2_model):
    from mesh.net.client import server_info

    with DistributedModelForCausalLM.from_pretrained("smollm2", swarm.initial_peers) as model:
        client = model.client
        conv = Conversation(model, max_length=512, system=None)
        sampling = dict(max_new_tokens=24)

        def tokens_at_first_server() -> int:
            first = conv.session.remote.route[0].peer_id
            return client.call(server_info, client.node, first).counters["tokens_from_clients"]

        _, count1, _ = conv.turn("My name is Ada. Reply with one short sentence.", sampling, lambda _: None)
        first_prompt = encode_messages(model.tokenizer, conv.messages[:1]).shape[1]
        sent_before = tokens_at_first_server()
        second, count2, _ = conv.turn("What is my name?", sampling, lambda _: None)
        second_prompt = encode_messages(model.tokenizer, conv.messages[:-1]).shape[1]
        # the second turn reused the session: the first server got only what it had not seen (the new
        # turn's tokens, and the first answer's last token), never the history again
        already = first_prompt + count1 - 1  # every position through turn 1, but its last sampled token
        assert tokens_at_first_server() - sent_before == (second_prompt - already) + (count2 - 1)
        ids = encode_messages(model.tokenizer, conv.messages[:-1])
        ref = smollm2_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                     pad_token_id=model.tokenizer.pad_token_id)
        expected = model.tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
        assert second == expected
        conv.session.close()


def test_int8_on_every_hop_through_servers_keeps_greedy(swarm, smollm2_model):
    with DistributedModelForCausalLM.from_pretrained("smollm2", swarm.initial_peers, compression="int8") as model:
        ids = encode_messages(model.tokenizer, [{"role": "user", "content": "List the planets of the solar system."}])
        out = model.generate(ids, max_new_tokens=40)
        ref = smollm2_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                                     pad_token_id=model.tokenizer.pad_token_id)
        n = ids.shape[1]
        assert_greedy_equal_but_near_ties(smollm2_model, ids, out[0, n:].tolist(), ref[0, n:].tolist())


def test_interactive_chat_reset_and_exit(swarm):
    """`mesh chat` reading turns from stdin: two answers around a /reset, each with its stats line
    (speculation included), a blank line ignored, then /exit."""
    import subprocess

    from procs import MESH

    peers = [arg for p in swarm.initial_peers for arg in ("--initial-peers", p)]
    done = subprocess.run([*MESH, "chat", "smollm2", "-n", "8", *peers], capture_output=True, text=True,
                          input="What is 2+2?\n\n/reset\nSay hi.\n/exit\n", timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("you> ") == 5, done.stdout  # one prompt per line read, /exit's included
    assert done.stderr.count("tokens in") == 2 and "conversation reset" in done.stderr, done.stderr[-2000:]
    assert done.stderr.count("drafts accepted") == 2
