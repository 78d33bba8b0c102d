"""Spot-check pieces without a network: commitments, the check schedule, tolerances, and rewinding."""

from __future__ import annotations

import random

import torch
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from mesh.model.errors import BadRequest, Rewind
from mesh.model.generation import Generator, LocalSpans
from mesh.model.head import head_from_model
from mesh.model.span import span_from_model
from mesh.net.announce import ServerInfo
from mesh.net.commitments import Commitment, as_received, parse_commitments
from mesh.net.messages import Message, StepResult
from mesh.net.verify import SpotChecker, StepRecord, check_commitments, check_rate, tolerance

import pytest


def _signer():
    keys = create_new_key_pair()
    return keys.private_key, ID.from_pubkey(keys.public_key).to_base58()


def test_commitments_bind_a_server_to_its_outputs():
    key, peer = _signer()
    out = torch.randn(1, 3, 8)
    c = Commitment.make(key, "session-a", 5, out)
    assert c.signed_by(peer, "session-a") and c.matches(out)
    assert not c.signed_by(peer, "session-b")  # not replayable in another session
    assert not c.signed_by(_signer()[1], "session-a")  # nor claimable by another peer
    tampered = out.clone()
    tampered[0, 1, 2] += 1e-6
    assert not c.matches(tampered)
    # through the wire and back
    result = Message.from_wire(StepResult(1, 5, out, [c]).to_wire())
    assert result.commitments == [c]
    with pytest.raises(BadRequest):
        parse_commitments([[5, 3, b"short", c.signature]], "x")


def test_history_is_checked_against_every_signed_step():
    key, peer = _signer()
    history = torch.randn(1, 6, 8)
    records = [StepRecord(0, 4, [(peer, "s", Commitment.make(key, "s", 0, history[:, 0:4]))]),
               StepRecord(4, 1, [(peer, "s", Commitment.make(key, "s", 4, history[:, 4:5]))]),
               StepRecord(5, 1, [(peer, "s", Commitment.make(key, "s", 5, history[:, 5:6]))])]
    assert check_commitments(history, peer, "s", records) is None
    other = history.clone()
    other[:, 4] += 1.0  # what it answers now is not what it sent at position 4
    assert check_commitments(other, peer, "s", records) == 4
    assert check_commitments(history[:, :5], peer, "s", records) == 5  # a history cut short


@pytest.mark.parametrize("compression", ["float16", "bfloat16", "int8"])
def test_what_a_receiver_decodes_is_stable(compression):
    """The commitment is on the decoded values; decoding them again gives the same values."""
    x = torch.randn(1, 5, 256) * 3
    x[0, :, 7] *= 5000  # an outlier channel, as residual streams have
    once = as_received(x, compression)
    assert torch.equal(as_received(once, compression), once)


def test_checks_come_at_the_rate_and_never_further_apart_than_the_gap():
    checker = SpotChecker(0.05, list, None, rng=random.Random(0))
    due = [checker.due() for _ in range(4000)]
    gaps = [b - a for a, b in zip([i for i, d in enumerate(due) if d], [i for i, d in enumerate(due) if d][1:])]
    assert max(gaps) <= checker.max_gap == 40
    assert 0.05 <= sum(due) / len(due) <= 0.08  # the rate, plus the forced checks
    assert not any(SpotChecker(0.0, list, None).due() for _ in range(100))
    with pytest.raises(BadRequest):
        check_rate(1.5)


def test_tolerance_follows_dtype_and_quantization():
    def info(quant: str, dtype: str) -> ServerInfo:
        return ServerInfo(peer_id="p", model_id="m", start=0, end=10, total_blocks=10, quant=quant, dtype=dtype)

    exact = info("none", "float32")
    assert tolerance(exact, exact, 10) == tolerance(exact, None, 10) <= 1e-3
    assert tolerance(info("nf4", "float32"), exact, 10) > tolerance(info("int8", "float32"), exact, 10) \
        > tolerance(info("none", "bfloat16"), exact, 10) > tolerance(exact, exact, 10)
    assert tolerance(info("nf4", "float32"), exact, 40) > tolerance(info("nf4", "float32"), exact, 10)


def test_a_rewind_feeds_again_and_the_tokens_equal_a_run_without_lies(tiny_dirs):
    """Blocks that lie from cache position 14 on and raise Rewind(14) once later (as a spot check does):
    the tokens equal an honest run's, and the rewind is reported with the tokens that stand."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dirs["llama"]), dtype=torch.float32).eval()
    head = head_from_model(model)
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    honest = Generator(head, LocalSpans([span_from_model(model, 0, 6)], 1, 64)).generate(ids)

    blocks = LocalSpans([span_from_model(model, 0, 6)], 1, 64)
    state = {"lying": True, "rewound": False}

    def run_blocks(hidden, position_ids, mask, position):
        out = blocks(hidden, position_ids, mask, position)
        if state["lying"]:
            start = position
            out = out.clone()
            for i in range(out.shape[1]):
                if start + i >= 14:
                    out[:, i] += 10.0
            if position + hidden.shape[1] >= 20:  # the check that catches it
                state["lying"] = False
                raise Rewind(14)
        return out

    kept = []
    gen = Generator(head, run_blocks)
    gen.on_rewind = kept.append
    assert gen.generate(ids).tolist() == honest.tolist()
    assert kept == [14 - 10 + 1]  # outputs up to position 13 were honest: the tokens they chose stand


async def test_a_local_shadow_fed_in_pieces_equals_one_pass(tiny_dirs):
    """A shadow holds a cache: positions fed check by check (and again after a rewind) give what one pass
    over the whole history gives."""
    from transformers import AutoModelForCausalLM

    from mesh.net.shadows import LocalShadow

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dirs["llama"]), dtype=torch.float32).eval()
    span = span_from_model(model, 0, 6)
    x = torch.randn(1, 10, 64, generator=torch.Generator().manual_seed(0))
    pos, mask = torch.arange(10)[None], torch.ones(1, 10, dtype=torch.long)
    with torch.no_grad():
        whole = span(x, pos, None, mask)
    shadow = LocalShadow(span, 1, 16)
    first = await shadow.run(0, x[:, :7], pos[:, :7], mask[:, :7])
    again = await shadow.run(5, x[:, 5:], pos[:, 5:], mask[:, 5:])  # from an earlier position: rolled back
    assert shadow.fed == 10
    assert torch.allclose(torch.cat([first[:, :5], again], dim=1), whole, atol=1e-5)


def test_the_default_rate_is_small_on_the_open_swarm_and_zero_in_a_private_one(monkeypatch):
    from mesh.net.verify import DEFAULT_VERIFY, verify_rate

    monkeypatch.delenv("MESH_VERIFY", raising=False)
    assert verify_rate(None, private=False) == DEFAULT_VERIFY == 0.02
    assert verify_rate(None, private=True) == 0.0
    assert verify_rate(0.3, private=True) == 0.3
    monkeypatch.setenv("MESH_VERIFY", "0.1")
    assert verify_rate(None, private=False) == 0.1 and verify_rate(0.0, private=False) == 0.0
    monkeypatch.setenv("MESH_VERIFY", "often")
    with pytest.raises(BadRequest):
        verify_rate(None, private=False)
