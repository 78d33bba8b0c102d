"""Fine-tuning rows: each shape tokenized with the right labels, bad rows named by line before training."""

from __future__ import annotations

import json

import pytest

from mesh.model.data import IGNORE, DataError, collate, epoch_order, load_jsonl


@pytest.fixture(scope="module")
def tok(smollm2):
    from mesh.model.head import load_tokenizer

    return load_tokenizer(smollm2)


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_shapes_and_labels(tok, tmp_path):
    data = load_jsonl(write(tmp_path / "d.jsonl", [
        {"text": "Hello there."},
        {"prompt": "Q: 2+2?", "completion": " 4"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    ]), tok, 256)
    text, pc, chat = data.examples
    assert text.labels == text.input_ids and text.input_ids[-1] == tok.eos_token_id
    n_prompt = len(tok("Q: 2+2?")["input_ids"])
    assert pc.labels[:n_prompt] == [IGNORE] * n_prompt and pc.labels[n_prompt:] == pc.input_ids[n_prompt:]
    learned = tok.decode([t for t, l in zip(chat.input_ids, chat.labels) if l != IGNORE])
    assert "Hello!" in learned and "Hi" not in learned
    ids, mask, labels = collate(data.examples, tok.pad_token_id)
    assert ids.shape == mask.shape == labels.shape and int(mask.sum()) == data.tokens
    assert (labels[mask == 0] == IGNORE).all()


def test_bad_rows_are_reported_with_line_numbers(tok, tmp_path):
    path = write(tmp_path / "bad.jsonl", [
        {"text": "fine"}, "{not json", "", {"prompt": "only a prompt"}, {"text": "word " * 400},
        {"messages": [{"role": "user", "content": "no answer"}]}, [1, 2],
    ])
    with pytest.raises(DataError) as e:
        load_jsonl(path, tok, 64)
    msg = str(e.value)
    assert "6 bad rows" in msg
    for n in (2, 3, 4, 5, 6, 7):
        assert f"line {n}:" in msg
    assert "invalid JSON" in msg and "more than --max-length 64" in msg and "--skip-bad" in e.value.hint
    kept = load_jsonl(path, tok, 64, skip_bad=True)
    assert len(kept.examples) == 1 and [n for n, _ in kept.skipped] == [2, 3, 4, 5, 6, 7]


def test_epoch_order_depends_on_seed_and_epoch_only():
    assert epoch_order(10, 3, 1) == epoch_order(10, 3, 1)
    assert epoch_order(10, 3, 1) != epoch_order(10, 3, 2) and sorted(epoch_order(10, 4, 0)) == list(range(10))
