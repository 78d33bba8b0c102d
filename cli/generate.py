"""`mesh generate`: one prompt in, a completion out."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from .common import (device_option, draft_option, dtype_option, initial_peers_option, speculate_option,
                     swarm_key_option, verify_option)
from .output import one_line_errors, stderr, write

__all__ = ["generate"]


@one_line_errors
def generate(
    model: str = typer.Argument("smollm2", help="Model name (e.g. smollm2, llama-2-70b), hub id, folder or .gguf."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue (or the user turn with --chat)."),
    local: bool = typer.Option(False, "--local", help="Run every block in this process (the reference run)."),
    initial_peers: list[str] = initial_peers_option(),
    swarm_key: Path = swarm_key_option(),
    verify: float = verify_option(),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1, help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy; above 0 samples."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0, help="Nucleus sampling threshold."),
    top_k: int = typer.Option(0, min=0, help="Sample among the k most likely tokens (0 = all)."),
    repetition_penalty: float = typer.Option(1.0, min=0.0, help="Penalty for repeated tokens (1 = none)."),
    seed: int = typer.Option(0, help="Random seed for sampling."),
    chat: bool = typer.Option(True, "--chat/--raw", help="Wrap the prompt in the model's chat template."),
    spans: int = typer.Option(3, min=1, help="How many spans the blocks are split into (--local)."),
    device: str = device_option(),
    dtype: str = dtype_option(),
    compression: str = typer.Option("none", help="Hidden states on the wire: none, float16, bfloat16, int8."),
    exact: bool = typer.Option(False, "--exact", help="Use only float32, unquantized servers (reproducible)."),
    speculate: str = speculate_option(),
    draft: str = draft_option(),
) -> None:
    """Generate a completion for one prompt, through the swarm (or every block here with --local)."""
    import torch

    from ..model.device import Device
    from ..model.chat import TextStream, encode_messages, encode_text, has_chat_template
    from ..model.generation import Generator, LocalSpans, SamplingConfig
    from ..model.head import load_tokenizer
    from ..model.local import load_local
    from ..model.sources import resolve_model
    from ..model.speculative import load_draft, new_speculator, parse_speculate

    where = Device.choose(device, dtype)
    mode = parse_speculate(speculate)
    torch.manual_seed(seed)
    if local:
        source = resolve_model(model)
        tokenizer = load_tokenizer(source)
        with stderr().status(f"loading {source.name} ({source.num_blocks} blocks in {spans} spans)"):
            head, span_list = load_local(source, where.dtype, spans, where.torch)
    else:
        from .. import DistributedModelForCausalLM

        with stderr().status(f"joining the swarm for {model}"):
            lm = DistributedModelForCausalLM.from_pretrained(model, initial_peers, device=where.torch,
                                                             dtype=dtype, compression=compression, exact=exact,
                                                             swarm_key=swarm_key, verify=verify)
        tokenizer, head = lm.tokenizer, lm.head
    try:
        ids = (encode_messages(tokenizer, [{"role": "user", "content": prompt}])
               if chat and has_chat_template(tokenizer) else encode_text(tokenizer, prompt))
        eos = tokenizer.eos_token_id
        config = SamplingConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                temperature=temperature or 1.0, top_p=top_p, top_k=top_k,
                                repetition_penalty=repetition_penalty,
                                eos_token_ids=[eos] if eos is not None else [], pad_token_id=tokenizer.pad_token_id)
        drafter = load_draft(draft, head.embedding_layer().num_embeddings) if draft and mode != "off" else None
        if local:
            blocks = LocalSpans(span_list, batch_size=1, max_length=ids.shape[1] + max_new_tokens)
            gen, route = Generator(head, blocks, tokenizer), "local"
        else:
            session = lm.inference_session(ids.shape[1] + max_new_tokens)
            gen, route = session.generator, session.describe()  # with its spot checks, if any
            gen.on_rewind = lambda kept: stderr().print(
                f"\n[a server sent wrong values and was banned; {kept} tokens stand, the rest follow again]")
        gen.speculator = new_speculator(mode, drafter)
        text = TextStream(tokenizer)
        started, count = time.perf_counter(), 0
        for token in gen.stream(ids, None, config):
            count += 1
            write(text.push(int(token[0])))
        write("\n")
        elapsed = time.perf_counter() - started
        spec = f" · {gen.speculator.summary()}" if gen.speculator is not None else ""
        stderr().print(f"[dim]{route} · {count} tokens in {elapsed:.2f} s ({count / max(elapsed, 1e-9):.1f} tokens/s, "
                       f"prompt {ids.shape[1]} tokens){spec}[/dim]", highlight=False)
    finally:
        if not local:
            lm.close()
