"""`mesh finetune` with SmolLM2 through `mesh serve` processes: learning a format, chat with the adapter,
a server killed mid-training, and a killed run resumed to the same parameters."""

from __future__ import annotations

import re
import signal
import subprocess

import pytest
import torch
import trio
from safetensors.torch import load_file

from formatdata import PREFIX, write
from mesh import DistributedModelForCausalLM
from mesh.cli.chat import Conversation
from procs import MeshProcess, run_mesh

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

QUESTION = "What is the capital of Italy?"


@pytest.fixture(scope="module")
def swarm(smol_swarm):
    return smol_swarm


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return write(root / "train.jsonl", 0, 64), write(root / "eval.jsonl", 1, 12)


def peers(swarm) -> list[str]:
    return [arg for p in swarm.initial_peers for arg in ("--initial-peers", p)]


async def chat_answer(swarm, *extra: str) -> str:
    result = await run_mesh("chat", "smollm2", "-p", QUESTION, "-n", "12", *peers(swarm), *extra, timeout=180)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode().strip()


def base_answer(swarm) -> str:
    with DistributedModelForCausalLM.from_pretrained("smollm2", swarm.initial_peers) as model:
        conv = Conversation(model, max_length=256, system=None)
        answer, _, _ = conv.turn(QUESTION, dict(max_new_tokens=12), lambda _: None)
        conv.session.close()
    return answer.strip()


# (steps, learning rate) per method: the fewest steps that learned with a margin in local runs. LoRA at
# 4e-3 takes the eval loss from 3.2 to 0.1 in 6 steps, and chat then answers in the format. Prompt tuning
# moves slower: 8 steps at 0.3 lower the eval loss by half (30 % is asked), and chat with those prompts
# answers differently from the base model, but not yet in the format (that took 16 steps at 0.1).
STEPS = {"lora": (6, 4e-3), "prompt": (8, 0.3)}


async def test_finetune_learns_the_format_and_chat_follows_it(swarm, data, tmp_path):
    """`mesh finetune` through the swarm, then `mesh chat --adapter` uses what it learned.

    The two runs go at once, each on its own replicas (clients spread training over a span's servers), and
    so do the chats."""
    train, evals = data
    runs: dict[str, subprocess.CompletedProcess] = {}
    answers: dict[str, str] = {}

    async def finetune(method: str) -> None:
        steps, lr = STEPS[method]
        runs[method] = await run_mesh(
            "finetune", str(train), "--method", method, "--eval", str(evals), "--out", str(tmp_path / method),
            "--max-steps", str(steps), "--lr", str(lr), "--num-prompts", "8", *peers(swarm), timeout=600)

    async def answer(name: str) -> None:
        if name == "base":  # asked in this process, as the same conversation `mesh chat` runs
            answers[name] = await trio.to_thread.run_sync(base_answer, swarm)
        else:
            answers[name] = await chat_answer(swarm, "--adapter", str(tmp_path / name))

    async with trio.open_nursery() as nursery:
        for method in STEPS:
            nursery.start_soon(finetune, method)
    for method, result in runs.items():
        text = result.stdout.decode()
        assert result.returncode == 0, text + result.stderr.decode()[-3000:]
        first, last = map(float, re.search(r"eval loss ([\d.]+) → ([\d.]+)", text).groups())
        print(f"{method}: eval loss {first:.3f} → {last:.3f} in {STEPS[method][0]} steps")
        assert last <= 0.7 * first, method
    async with trio.open_nursery() as nursery:
        for name in (*STEPS, "base"):
            nursery.start_soon(answer, name)
    assert answers["lora"].startswith(PREFIX), answers["lora"]
    assert not answers["base"].startswith(PREFIX), answers["base"]  # the base model never answers so
    assert answers["prompt"] != answers["base"], answers  # the learned prompts reach the servers


async def test_training_goes_on_when_a_server_dies(swarm, data, tmp_path):
    """Both servers of blocks 10:20 are frozen, so the trainer's next request to 10:20 is stuck in one of
    them (its -vv log names which); that one is killed and the other resumed. The request fails, the hop
    is rerouted to the other server, and training goes on to its last step."""
    train, _ = data
    proc = MeshProcess(["finetune", str(train), "--method", "lora", "--out", str(tmp_path / "a"),
                        "--max-steps", "4", "--checkpoint-every", "0", "-vv", *peers(swarm)], tmp_path / "ft.log")
    middle = [i for i, span in enumerate(swarm.spans) if span == (10, 20) and swarm.procs[i].poll() is None]
    victim = None
    try:
        with trio.fail_after(300):
            while "step 2/4" not in proc.output():
                assert proc.proc.poll() is None, proc.output()[-3000:]
                await trio.sleep(0.2)
        for i in middle:
            swarm.procs[i].send_signal(signal.SIGSTOP)
        def calls() -> list[tuple[str, str]]:
            return re.findall(r"(?:forward|backward) of blocks (\d+):\d+ on (\w+)", proc.output())

        with trio.fail_after(10):  # stuck: the last request, to 10:20, has no successor for half a second
            while True:
                before = calls()
                await trio.sleep(0.5)
                if calls() == before and before and before[-1][0] == "10":
                    break
        stuck = before[-1][1]
        victim = next(i for i in middle if swarm.peer_id(i).endswith(stuck))
        swarm.procs[victim].send_signal(signal.SIGKILL)
        for i in middle:
            swarm.procs[i].send_signal(signal.SIGCONT)
        assert await proc.wait_exit(300) == 0, proc.output()[-3000:]
        out = proc.output()
        assert "step 4/4" in out and "mesh: trained 4 steps" in out, out[-3000:]
        rerouted = re.search(r"(\d+) failed hops? rerouted", out)
        assert rerouted and int(rerouted.group(1)) >= 1, out[-3000:]
    finally:
        for i in middle:
            swarm.procs[i].send_signal(signal.SIGCONT)
        proc.cleanup()
        if victim is not None:
            swarm.respawn(victim)


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


async def test_resume_after_a_kill_equals_an_uninterrupted_run(swarm, data, tmp_path):
    train, _ = data
    common = ["--method", "lora", "--max-steps", "2", "--checkpoint-every", "1", "--seed", "3", "-v",
              *peers(swarm)]
    results = {}

    async def uninterrupted() -> None:
        results["whole"] = await run_mesh("finetune", str(train), "--out", str(tmp_path / "whole"), *common,
                                          timeout=600)

    async with trio.open_nursery() as nursery:  # the uninterrupted run goes on beside the one we kill
        nursery.start_soon(uninterrupted)
        proc = MeshProcess(["finetune", str(train), "--out", str(tmp_path / "cut"), *common], tmp_path / "cut.log")
        try:
            with trio.fail_after(300):
                while "checkpoint saved at step 1" not in proc.output():
                    assert proc.proc.poll() is None, proc.output()[-3000:]
                    await trio.sleep(0.1)
            proc.signal(signal.SIGKILL)
            await proc.wait_exit(10)
        finally:
            proc.cleanup()
    assert results["whole"].returncode == 0, results["whole"].stderr.decode()[-3000:]
    resumed = await run_mesh("finetune", str(train), "--out", str(tmp_path / "cut"), "--resume", *common,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    assert "resuming at step 1" in resumed.stderr.decode()
    a, b = adapter_tensors(tmp_path / "whole"), adapter_tensors(tmp_path / "cut")
    assert a.keys() == b.keys()
    # Equal but for float rounding. The two runs take different random routes over the replicas; they
    # came out bit-identical in 11 repeated runs here (3 of them with both cores busy), yet one run of the
    # whole suite on a new machine did not. A resume that got the state wrong (data position, optimizer
    # moments, step) moves the weights by the order of the learning rate (2e-3 per step), a
    # thousand times the tolerance; rounding in the blocks reaches the weights a million times smaller.
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"resumed vs uninterrupted: largest difference {worst:.3g}")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
