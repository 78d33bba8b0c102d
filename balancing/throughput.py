"""What a server announces as its throughput, from what it measured.

Measured per block (one block of the model, converted exactly as served):
- `inference_rps`: single-token decode steps per second with a growing attention cache;
- `forward_rps`: tokens per second of forward passes over long sequences (prompts, training);
- `network_rps`: hidden states per second the host's link carries at 16 bits per value.

The announced per-block throughput, what balancing sums per block, is

    compute = 1 / (DECODE_SHARE / inference_rps + (1 - DECODE_SHARE) / forward_rps)
    throughput = min(compute / ((num_blocks + 1) / 2), network_rps × (RELAY_FACTOR if relayed else 1))

`compute` is the rate of one block on a mix of work where half the tokens are decode steps and half come in
long sequences (time per token adds, so the rates combine harmonically). A request enters a span at a
uniformly random block and runs to its end, so it uses (n + 1) / 2 of the server's n blocks on average:
that is how much of the server each token takes. Routing uses `inference_rps` directly (it knows exactly
how many blocks a hop uses).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_BANDWIDTH", "Measurement", "network_rps", "compute_rps", "server_throughput"]

DECODE_SHARE = 0.5
RELAY_FACTOR = 0.2  # a relayed server's bytes cross two links and share the relay's
DEFAULT_BANDWIDTH = 100e6  # bits/s assumed when the link could not be measured
BITS_PER_VALUE = 16


@dataclass(frozen=True)
class Measurement:
    """A server's measured rates: per-block decode and forward, and its link."""

    inference_rps: float  # per block
    forward_rps: float  # per block
    network_rps: float
    network_measured: bool = False

    def to_dict(self) -> dict:
        return {"inference_rps": self.inference_rps, "forward_rps": self.forward_rps,
                "network_rps": self.network_rps, "network_measured": self.network_measured}

    @classmethod
    def from_dict(cls, d: dict) -> "Measurement":
        return cls(float(d["inference_rps"]), float(d["forward_rps"]), float(d["network_rps"]),
                   bool(d.get("network_measured", False)))


def network_rps(bits_per_second: float, hidden_size: int) -> float:
    """Hidden states per second a link of `bits_per_second` carries."""
    return bits_per_second / (hidden_size * BITS_PER_VALUE)


def compute_rps(inference_rps: float, forward_rps: float) -> float:
    """One block's compute rate for the mix of decode steps and forward tokens a server sees."""
    return 1.0 / (DECODE_SHARE / inference_rps + (1 - DECODE_SHARE) / forward_rps)


def server_throughput(m: Measurement, num_blocks: int, relayed: bool = False) -> float:
    """Per-block throughput a server of `num_blocks` blocks announces (formula in the module docstring)."""
    average_blocks_used = (num_blocks + 1) / 2
    return min(compute_rps(m.inference_rps, m.forward_rps) / average_blocks_used,
               m.network_rps * (RELAY_FACTOR if relayed else 1.0))
