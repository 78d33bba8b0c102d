"""Where a process computes: one device and one dtype, chosen once, for servers and clients alike.

Every torch path of mesh takes a `Device` instead of asking torch itself, so the CPU run in CI walks the
same code a CUDA or Apple MPS run does: weights, caches, adapters and prompts are placed on
`Device.torch`, and tensors cross to the host only where they leave the process (the wire codec) or
reach the sampler. `--device auto` prefers CUDA, then MPS, then the CPU; naming a device the machine
lacks fails at once with one line, rather than later inside a kernel.

The default dtype follows the device: bfloat16 on GPUs that support it (same range as float32, so no
overflow in long prompts), float16 on older GPUs and on MPS, float32 on the CPU (where half-precision
matmuls are slower than float32 ones).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BadRequest

__all__ = ["Device", "resolve_device", "default_dtype", "parse_dtype", "DTYPES"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device(name: str = "auto") -> torch.device:
    """`auto`, `cpu`, `cuda`, `cuda:N` or `mps` as a torch device present on this machine, else a BadRequest."""
    text = (name or "auto").strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise BadRequest(f"unknown device {name!r}", hint="one of auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise BadRequest(f"--device {text}: CUDA is not available here ({why})",
                             hint="use --device cpu, or install the CUDA build of torch")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise BadRequest(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                             hint=f"cuda:0 … cuda:{torch.cuda.device_count() - 1}")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not _mps_available():
            raise BadRequest(f"--device {text}: Apple MPS is not available here", hint="use --device cpu")
        return torch.device("mps")
    raise BadRequest(f"unsupported device {name!r}", hint="one of auto, cpu, cuda, cuda:N, mps")


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on GPUs that support it, float16 on other GPUs and MPS, float32 on the CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def parse_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """A --dtype value (None or "auto": the device's default) as a torch dtype, or a BadRequest."""
    if name is None or name.lower() == "auto":
        return default_dtype(device)
    if name.lower() not in DTYPES:
        raise BadRequest(f"unknown dtype {name!r}", hint="one of auto, float32, bfloat16, float16")
    dtype = DTYPES[name.lower()]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise BadRequest(f"{torch.cuda.get_device_name(device)} has no bfloat16", hint="use --dtype float16")
    return dtype


def _host_available() -> int:
    """Bytes the kernel says can be allocated without swapping (MemAvailable), or free pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Device:
    """The device and dtype one process computes in."""

    torch: torch.device
    dtype: torch.dtype

    @classmethod
    def choose(cls, device: str | torch.device = "auto", dtype: str | torch.dtype | None = None) -> "Device":
        """From the --device and --dtype options (or the Python API's device= and dtype=)."""
        chosen = resolve_device(str(device))
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        return cls(chosen, parse_dtype(dtype, chosen))

    @classmethod
    def cpu(cls, dtype: torch.dtype = torch.float32) -> "Device":
        return cls(torch.device("cpu"), dtype)

    @property
    def type(self) -> str:
        return self.torch.type

    @property
    def name(self) -> str:
        """What `mesh status` shows: the GPU's name, "mps" or "cpu"."""
        if self.type == "cuda":
            return torch.cuda.get_device_name(self.torch)
        return self.type

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def free_memory(self) -> int:
        """Bytes that can still be allocated on this device: the GPU's free memory, else the host's."""
        if self.type == "cuda":
            return int(torch.cuda.mem_get_info(self.torch)[0])
        if self.type == "mps":
            return max(0, int(torch.mps.recommended_max_memory()) - int(torch.mps.driver_allocated_memory()))
        return _host_available()

    def synchronize(self) -> None:
        """Wait for queued kernels, so a timer around GPU work measures the work, not its launch."""
        if self.type == "cuda":
            torch.cuda.synchronize(self.torch)
        elif self.type == "mps":
            torch.mps.synchronize()

    def put(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`t` on this device (and at `dtype` if given); host tensors are copied without blocking where the
        device allows it (the copy is ordered before any kernel that reads it)."""
        return t.to(self.torch, dtype=dtype, non_blocking=self.type == "cuda")
