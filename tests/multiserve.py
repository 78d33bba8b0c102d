"""Several mesh servers in one process: `python multiserve.py SPEC…`, SPEC = LABEL=FOLDER@START:END@QUANT[@PEER].

Each server is the product's own `run_server` with its own libp2p host on loopback, as `mesh serve` runs
it; they share the process (one SIGKILL takes them all down at once) and one throughput measurement. The
family tests use it to give nine models a swarm each at the cost of a few processes. Prints, per server,
`mesh: LABEL listening on ADDR` and `mesh: LABEL serving blocks START:END`.
"""

import importlib
import sys

import torch
import trio

from mesh.model.device import Device
from mesh.model.families import FAMILIES
from mesh.model.measure import cached, measure_block, measurement_key
from mesh.model.sources import cache_root, resolve_model
from mesh.net.node import NodeConfig
from mesh.net.server import ServerConfig, run_server


def config(spec: str) -> tuple[str, ServerConfig]:
    label, rest = spec.split("=", 1)
    folder, blocks, quant, *peer = rest.split("@")
    node = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], initial_peers=peer)
    return label, ServerConfig(model=folder, blocks=blocks, node=node, device=Device.cpu(), quant=quant,
                               announce_period=1.0, bandwidth_mbps=1000.0)


def share_one_measurement(configs: list[ServerConfig]) -> None:
    """Measure one tiny block once and let every server here announce that rate: the tests check tokens,
    not routing, and each server measuring its own model and quantization would take a second apiece."""
    sources = [resolve_model(cfg.model) for cfg in configs]
    decode, forward = measure_block(sources[0].config, Device.cpu(), "none")
    for cfg, source in zip(configs, sources):
        cached(cache_root(cfg.cache_dir), measurement_key(source.model_id, cfg.device, cfg.quant),
               lambda: {"inference_rps": decode, "forward_rps": forward})


async def serve(nursery: trio.Nursery, label: str, cfg: ServerConfig) -> None:
    server = await nursery.start(lambda task_status: run_server(cfg, task_status=task_status))
    for addr in server.node.join_addrs():
        print(f"mesh: {label} listening on {addr}", flush=True)
    print(f"mesh: {label} serving blocks {server.blocks[0]}:{server.blocks[1]}", flush=True)


async def main() -> None:
    servers = [config(spec) for spec in sys.argv[1:]]
    share_one_measurement([cfg for _, cfg in servers])
    async with trio.open_nursery() as nursery:
        for label, cfg in servers:
            nursery.start_soon(serve, nursery, label, cfg)


# The servers load in worker threads at once; modules imported lazily there would race (accelerate's
# import is circular), so everything they import on the way is imported first, here.
for module in ["accelerate", "bitsandbytes", "peft", *(f.module for f in FAMILIES)]:
    importlib.import_module(module)
torch.set_num_threads(1)
trio.run(main)
