"""`mesh chat`: talk to a model through the swarm, one session for the whole conversation."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from .common import (device_option, draft_option, dtype_option, initial_peers_option, speculate_option,
                     swarm_key_option, verify_option)
from .output import one_line_errors, setup_logging, stderr, write

__all__ = ["Conversation", "chat"]


class Conversation:
    """Chat turns fed into one inference session: each turn sends only the tokens the servers lack."""

    def __init__(self, model, max_length: int, system: str | None) -> None:
        self.model = model
        self.max_length = max_length
        self.system = system
        self.session = None
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        if self.session is not None:
            self.session.close()
        self.session = self.model.inference_session(self.max_length)
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def turn(self, text: str, sampling: dict, on_text) -> tuple[str, int, float]:
        """Answer `text`; returns (answer, tokens, seconds). Ctrl-C stops the answer, keeping what was said."""
        import torch

        from ..model.chat import TextStream, encode_messages

        tokenizer = self.model.tokenizer
        self.messages.append({"role": "user", "content": text})
        full = encode_messages(tokenizer, self.messages)
        gen = self.session.generator
        if gen.ids is not None and (full.shape[1] <= gen.ids.shape[1] or
                                    not torch.equal(full[:, :gen.ids.shape[1]], gen.ids)):
            self.reset()  # the template re-tokenised history differently: start the session over
            self.messages.append({"role": "user", "content": text})
            gen = self.session.generator
        new = full if gen.ids is None else full[:, gen.ids.shape[1]:]
        if full.shape[1] + sampling["max_new_tokens"] > self.max_length:
            self.messages.pop()
            raise _too_long(self.max_length)
        stream = TextStream(tokenizer)
        first = (0 if gen.ids is None else gen.ids.shape[1]) + new.shape[1]

        def rewound(kept: int) -> None:  # a server was caught lying: what stands is said again
            nonlocal stream, count
            stream, count = TextStream(tokenizer), kept
            on_text("\n[a server sent wrong values and was banned; the answer again from its last checked token]\n")
            on_text("".join(stream.push(int(t)) for t in gen.ids[0, first:first + kept]))

        gen.on_rewind = rewound
        started, count = time.perf_counter(), 0
        try:
            for token in self.model.stream(new, session=self.session, **sampling):
                count += 1
                on_text(stream.push(int(token[0])))
        except KeyboardInterrupt:
            on_text(" [stopped]")
        finally:
            gen.on_rewind = None
        self.messages.append({"role": "assistant", "content": stream.text})
        return stream.text, count, time.perf_counter() - started

    def answer(self, text: str, sampling: dict) -> None:
        """One turn on the terminal: the answer streamed to stdout, then a dim stats line on stderr."""
        _, count, seconds = self.turn(text, sampling, write)
        write("\n")
        spec = self.session.generator.speculator
        stderr().print(f"[dim]{self.session.describe()} · {count} tokens in {seconds:.1f} s "
                       f"({count / max(seconds, 1e-9):.1f} tokens/s){' · ' + spec.summary() if spec else ''}[/dim]",
                       highlight=False)

    def repl(self, sampling: dict) -> None:
        """Turns read from stdin until /exit or end of input; an error ends the turn, not the chat."""
        from ..model.errors import MeshError

        err = stderr()
        err.print(f"[dim]chatting with {self.model.source.model_id} · /reset to start over, /exit to leave[/dim]")
        while True:
            try:
                text = input("you> ").strip()
            except EOFError:
                return
            except KeyboardInterrupt:
                write("\n")
                continue
            if text in ("/exit", "/quit"):
                return
            if text == "/reset":
                self.reset()
                err.print("[dim]conversation reset[/dim]")
            elif text:
                try:
                    self.answer(text, sampling)
                except MeshError as e:
                    err.print(f"[bold red]error:[/bold red] {e.one_line()}", highlight=False)


def _too_long(max_length: int):
    from ..model.errors import MaxLengthExceeded

    return MaxLengthExceeded(f"the conversation would exceed {max_length} tokens", hint="type /reset")


@one_line_errors
def chat(
    model: str = typer.Argument("smollm2", help="Model name (e.g. llama-2-70b-chat), hub id, folder or .gguf."),
    initial_peers: list[str] = initial_peers_option(),
    swarm_key: Path = swarm_key_option(),
    verify: float = verify_option(),
    prompt: str = typer.Option(None, "--prompt", "-p", help="Answer this one message and exit (for scripts)."),
    system: str = typer.Option(None, help="System message for models whose template takes one."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", min=1),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy; above 0 samples."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    top_k: int = typer.Option(0, min=0),
    repetition_penalty: float = typer.Option(1.0, min=0.0),
    seed: int = typer.Option(0, help="Random seed for sampling."),
    max_length: int = typer.Option(2048, min=16, help="Tokens the whole conversation may take."),
    compression: str = typer.Option("none", help="Hidden states on the wire: none, float16, bfloat16, int8."),
    exact: bool = typer.Option(False, "--exact", help="Use only float32, unquantized servers (reproducible)."),
    adapter: str = typer.Option(None, help="A folder from `mesh finetune` (prompt or LoRA), or the name of an "
                                           "adapter the servers host."),
    speculate: str = speculate_option(),
    draft: str = draft_option(),
    device: str = device_option(),
    dtype: str = dtype_option(),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True),
) -> None:
    """Chat with MODEL through the swarm. Commands: /reset starts over, /exit leaves; Ctrl-C stops an answer."""
    import torch

    from .. import DistributedModelForCausalLM
    from ..model.chat import has_chat_template
    from ..model.device import Device
    from ..model.errors import MeshError
    from ..model.speculative import parse_speculate
    from ..net.codec import check_compression

    setup_logging(verbose)
    check_compression(compression)
    where = Device.choose(device, dtype)
    mode = parse_speculate(speculate)
    err = stderr()
    with err.status(f"joining the swarm for {model}"):
        lm = DistributedModelForCausalLM.from_pretrained(model, initial_peers, device=where.torch, dtype=dtype,
                                                         compression=compression, exact=exact, swarm_key=swarm_key,
                                                         verify=verify)
    with lm:
        lm.use_adapter(adapter)
        lm.use_speculation(mode, draft)
        if lm.tokenizer is None or not has_chat_template(lm.tokenizer):
            raise MeshError(f"{model} has no chat template", hint="use `mesh generate` for raw completion")
        torch.manual_seed(seed)
        sampling = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature or 1.0,
                        top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty)
        conv = Conversation(lm, max_length, system)
        try:
            if prompt is not None:
                conv.answer(prompt, sampling)
            else:
                conv.repl(sampling)
        finally:
            conv.session.close()
