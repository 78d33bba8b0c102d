"""`mesh finetune`: train soft prompts or LoRA adapters through the swarm's frozen blocks."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import device_option, dtype_option, initial_peers_option, swarm_key_option, verify_option
from .output import one_line_errors, setup_logging, stderr, write

__all__ = ["finetune"]


@one_line_errors
def finetune(
    data: Path = typer.Argument(..., help="JSON lines: {\"text\"}, {\"prompt\", \"completion\"} or {\"messages\"}."),
    model: str = typer.Option("smollm2", help="Model: name, hub id, folder or .gguf (as the servers serve it)."),
    method: str = typer.Option("lora", help="prompt (virtual tokens), deep-prompt (virtual tokens per block) "
                                            "or lora (low-rank adapters on --lora-targets)."),
    epochs: int = typer.Option(1, min=1),
    lr: float = typer.Option(None, help="Learning rate (default 2e-3 for lora, 0.1 for prompts)."),
    batch_size: int = typer.Option(4, min=1, help="Rows per optimizer step."),
    micro_batch: int = typer.Option(4, min=1, help="Rows per request to the swarm; micro-batches run in parallel."),
    max_length: int = typer.Option(256, min=2, help="Longest row in tokens; longer rows are bad rows."),
    eval: Path = typer.Option(None, help="JSON lines to compute the eval loss on, before training and each epoch."),
    out: Path = typer.Option(Path("adapter"), help="Folder for the adapter and its checkpoint."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in --out, exactly."),
    seed: int = typer.Option(0, help="Seed of the initialisation and of the data order."),
    checkpoint_every: int = typer.Option(50, min=0, help="Steps between checkpoints (0: only at the end)."),
    max_steps: int = typer.Option(None, min=1, help="Stop after this many optimizer steps."),
    num_prompts: int = typer.Option(16, min=1, help="Virtual tokens for prompt methods."),
    lora_rank: int = typer.Option(8, min=1),
    lora_alpha: float = typer.Option(16.0),
    lora_targets: str = typer.Option("", help="Comma-separated projections to adapt (default: the family's: "
                                              "q_proj,v_proj; query_key_value for BLOOM and Falcon; qkv_proj "
                                              "for Phi-3)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip bad rows (counted) instead of stopping."),
    local: bool = typer.Option(False, "--local", help="Run every block on this machine (a reference run)."),
    initial_peers: list[str] = initial_peers_option(),
    swarm_key: Path = swarm_key_option(),
    verify: float = verify_option(),
    device: str = device_option(),
    dtype: str = dtype_option(),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True),
) -> None:
    """Train an adapter on DATA through the swarm; the client holds every trainable parameter.

    Bad rows are reported with their line numbers before training starts. The result in --out loads with
    `mesh chat MODEL --adapter OUT` (LoRA also with peft on a full local model).
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ..api.finetune import FinetuneConfig, run_finetune
    from ..net.node import env_initial_peers

    setup_logging(verbose)
    cfg = FinetuneConfig(data=data, model=model, method=method, epochs=epochs, lr=lr, batch_size=batch_size,
                         micro_batch=micro_batch, max_length=max_length, eval=eval, out=out, resume=resume,
                         seed=seed, checkpoint_every=checkpoint_every, max_steps=max_steps,
                         num_prompts=num_prompts, lora_rank=lora_rank, lora_alpha=lora_alpha,
                         lora_targets=[t.strip() for t in lora_targets.split(",") if t.strip()],
                         skip_bad=skip_bad, local=local,
                         initial_peers=list(initial_peers or []) or env_initial_peers(), device=device, dtype=dtype,
                         swarm_key=swarm_key, verify=verify)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=stderr(), transient=False) as bar:
        task = bar.add_task(f"{method} on {data.name}", total=None, loss=float("nan"), tps=0.0)

        def on_progress(p) -> None:
            bar.update(task, completed=p.step, total=p.total, loss=p.loss, tps=p.tokens_per_s)

        def on_eval(epoch: int, loss: float) -> None:
            bar.console.print(f"eval loss {'before training' if epoch == 0 else f'after epoch {epoch}'}: {loss:.4f}")

        result = run_finetune(cfg, on_progress, on_eval)
    if result.skipped:
        stderr().print(f"skipped {result.skipped} bad rows")
    summary = f"mesh: trained {result.steps} steps; adapter in {result.out}"
    if result.retries:
        summary += f"; {result.retries} failed hops rerouted"
    if len(result.eval_losses) >= 2:
        first, last = result.eval_losses[0], result.eval_losses[-1]
        summary += f"; eval loss {first:.4f} → {last:.4f} ({(first - last) / first:.0%} lower)"
    write(summary + "\n")
