"""Where mesh computes: --device and --dtype, bitsandbytes per device, and GPU runs.

The CPU suite walks the one device path (every span, head and adapter goes through `model/device.py`);
tests marked `gpu` check the same path on CUDA and are skipped, with the reason, where there is none.
"""

from __future__ import annotations

import dataclasses
import subprocess
import time

import pytest
import torch
import typer
from transformers import AutoModelForCausalLM

from mesh.cli.main import app
from mesh.model.device import Device, default_dtype, parse_dtype, resolve_device
from mesh.model.errors import BadRequest
from mesh.model.generation import Generator, LocalSpans, SamplingConfig
from mesh.model.head import head_from_model, load_head
from mesh.model.quant import check_quant, quantizer, resolve_quant
from mesh.model.sources import resolve_model
from mesh.model.span import load_span, span_from_model
from procs import MESH, serve, wait_for_servers

NO_CUDA = "no CUDA device here: the GPU path runs on machines with one (the CPU suite covers the same code)"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)


def test_auto_prefers_cuda_then_mps_then_cpu():
    chosen = resolve_device("auto")
    if torch.cuda.is_available():
        assert chosen.type == "cuda"
    elif torch.backends.mps.is_available():
        assert chosen.type == "mps"
    else:
        assert chosen == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert default_dtype(torch.device("cpu")) == torch.float32
    assert parse_dtype("auto", torch.device("cpu")) == torch.float32
    assert parse_dtype("bf16", torch.device("cpu")) == torch.bfloat16


def test_a_device_this_machine_lacks_is_a_one_line_error():
    for name in ("tpu", "cuda:x", "vulkan"):
        with pytest.raises(BadRequest):
            resolve_device(name)
    missing = "cuda:99" if torch.cuda.is_available() else "cuda"
    with pytest.raises(BadRequest) as e:
        resolve_device(missing)
    assert "\n" not in e.value.one_line() and "CUDA" in e.value.one_line()
    with pytest.raises(BadRequest):
        parse_dtype("float8", torch.device("cpu"))


def test_every_computing_command_takes_device_and_dtype():
    group = typer.main.get_command(app)
    for name in ("serve", "chat", "generate", "finetune"):
        options = {o for p in group.commands[name].params for o in p.opts}
        assert {"--device", "--dtype"} <= options, name


def test_serve_on_a_missing_device_fails_at_once(tiny30):
    missing = "cuda:99" if torch.cuda.is_available() else "cuda"
    t0 = time.monotonic()
    result = subprocess.run([*MESH, "serve", str(tiny30), "--blocks", "0:2", "--device", missing,
                             "--listen", "/ip4/127.0.0.1/tcp/0", "--new-identity"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "CUDA" in lines[0], result.stderr
    assert time.monotonic() - t0 < 30  # import time only: no model is read, no network is joined


def test_bitsandbytes_modes_per_device():
    assert check_quant("nf4", "mps") == "nf4"
    with pytest.raises(BadRequest) as e:
        check_quant("int8", "mps")
    assert "nf4" in e.value.hint
    cuda = torch.device("cuda")  # a device object needs no GPU; resolve_quant only reads its type
    assert resolve_quant("auto", cuda, fits_unquantized=False) == "nf4"
    assert resolve_quant("auto", cuda, fits_unquantized=True) == "none"
    assert resolve_quant("auto", torch.device("cpu"), fits_unquantized=False) == "none"
    assert resolve_quant("int8", torch.device("cpu"), fits_unquantized=True) == "int8"


class FakeGPU(Device):
    """A CUDA device as a server's sizing sees it (type, name, free memory), on a machine without one."""

    free: int = 0

    @property
    def name(self) -> str:
        return "Fake GPU"

    def free_memory(self) -> int:
        return self.free


def test_blocks_auto_counts_the_devices_free_memory_and_auto_quant_follows(tiny30):
    from mesh.net.server import ServerConfig, blocks_that_fit, with_quant

    source = resolve_model(str(tiny30))

    def gpu(free: float) -> FakeGPU:
        device = FakeGPU(torch.device("cuda"), torch.bfloat16)
        object.__setattr__(device, "free", int(free))
        return device

    config = ServerConfig(str(tiny30), cache_tokens=1024, max_length=64)
    small = dataclasses.replace(config, device=gpu(4e6))  # half of it is the budget (MEMORY_SHARE)
    large = dataclasses.replace(config, device=gpu(200e6))
    assert blocks_that_fit(source, dataclasses.replace(small, quant="none")) < source.num_blocks
    assert blocks_that_fit(source, dataclasses.replace(large, quant="none")) == source.num_blocks
    assert with_quant(source, small, None).quant == "nf4"  # --blocks auto wants them all: they do not fit
    assert with_quant(source, small, (0, 2)).quant == "none"  # two blocks fit unquantized
    assert with_quant(source, large, None).quant == "none"
    assert with_quant(source, ServerConfig(str(tiny30)), None).quant == "none"  # the CPU never defaults to nf4


# ---------------------------------------------------------------------------------------------------------
# On a GPU


def _greedy(head, spans, ids: torch.Tensor, n: int) -> list[int]:
    gen = Generator(head, LocalSpans(spans, batch_size=1, max_length=ids.shape[1] + n))
    return [int(t[0]) for t in gen.stream(ids, None, SamplingConfig(max_new_tokens=n))]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_local_spans_on_cuda_equal_transformers_on_cuda(tiny30, dtype):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    source = resolve_model(str(tiny30))
    device = torch.device("cuda")
    spans = [load_span(source.path, source.config, a, b, dtype, device=device) for a, b in ((0, 12), (12, 30))]
    head = load_head(source, dtype, device)
    assert all(s.device.type == "cuda" for s in spans) and head.device.type == "cuda"
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    full = AutoModelForCausalLM.from_pretrained(str(tiny30), dtype=dtype).to(device).eval()
    ref = full.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device), max_new_tokens=24,
                        do_sample=False, pad_token_id=0)[0, 10:].tolist()
    assert _greedy(head, spans, ids, 24) == ref
    # the same blocks on the CPU: float32 tokens equal across devices
    if dtype == torch.float32:
        cpu = AutoModelForCausalLM.from_pretrained(str(tiny30), dtype=dtype).eval()
        assert _greedy(head_from_model(cpu), [span_from_model(cpu, 0, 30)], ids, 24) == ref


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode, bound", [("int8", 0.05), ("nf4", 0.2)])
def test_bitsandbytes_on_cuda_uses_the_gpu_kernels(tiny30, mode, bound):
    source = resolve_model(str(tiny30))
    device = torch.device("cuda")
    exact = load_span(source.path, source.config, 0, 6, torch.float16, device=device)
    quantized = load_span(source.path, source.config, 0, 6, torch.float16,
                          quantizer(mode, torch.float16, device), device=device)
    assert all(p.device.type == "cuda" for p in quantized.parameters())
    x = torch.randn(1, 16, source.config.hidden_size, device=device, dtype=torch.float16)
    pos = torch.arange(16, device=device)[None]
    with torch.no_grad():
        a, b = exact(x, pos).float(), quantized(x, pos).float()
    assert float((a - b).norm() / a.norm()) < bound


@pytest.mark.gpu
@pytest.mark.e2e
@needs_cuda
def test_cpu_and_gpu_servers_in_one_chain_with_a_cpu_client(tiny30, tmp_path):
    """A CPU server, then a GPU server, both float32; the client's head on the CPU: transformers' tokens."""
    from mesh import DistributedModelForCausalLM

    cpu = serve(tiny30, "0:15", tmp_path / "cpu.log", [], "--device", "cpu", "--dtype", "float32")
    procs = [cpu]
    try:
        boot = cpu.wait_ready_sync(90)
        procs.append(serve(tiny30, "15:30", tmp_path / "gpu.log", [boot], "--device", "cuda", "--dtype", "float32"))
        procs[1].wait_ready_sync(90)
        ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(1))
        ref = AutoModelForCausalLM.from_pretrained(str(tiny30), dtype=torch.float32).eval().generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, pad_token_id=0)
        with DistributedModelForCausalLM.from_pretrained(str(tiny30), [boot], device="cpu") as lm:
            lm.client.call(lambda: wait_for_servers(lm, 2))
            assert lm.generate(ids, max_new_tokens=24).tolist() == ref.tolist()
            devices = {i.device for i in lm.client.swarm.table.servers(lm.source.model_id)}
            assert devices == {"cpu", torch.cuda.get_device_name(0)}
    finally:
        for p in procs:
            p.cleanup()

