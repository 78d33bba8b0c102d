"""Several mesh servers in one process: `python multiserve.py SPEC…`, SPEC = LABEL=FOLDER@START:END@QUANT[@PEER].

Each server is the product's own `run_server` with its own libp2p host on loopback, as `mesh serve` runs
it; they only share the process, so one SIGKILL takes them all down at once. The family tests use it to
give nine models a swarm each at the cost of a few processes. Prints, per server,
`mesh: LABEL listening on ADDR` and `mesh: LABEL serving blocks START:END`.
"""

import importlib
import sys

import torch
import trio

from mesh.model.device import Device
from mesh.model.families import FAMILIES
from mesh.net.node import NodeConfig
from mesh.net.server import ServerConfig, run_server


def config(spec: str) -> tuple[str, ServerConfig]:
    label, rest = spec.split("=", 1)
    folder, blocks, quant, *peer = rest.split("@")
    node = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], initial_peers=peer)
    return label, ServerConfig(model=folder, blocks=blocks, node=node, device=Device.cpu(), quant=quant,
                               announce_period=1.0, bandwidth_mbps=1000.0)


async def serve(nursery: trio.Nursery, label: str, cfg: ServerConfig) -> None:
    server = await nursery.start(lambda task_status: run_server(cfg, task_status=task_status))
    for addr in server.node.join_addrs():
        print(f"mesh: {label} listening on {addr}", flush=True)
    print(f"mesh: {label} serving blocks {server.blocks[0]}:{server.blocks[1]}", flush=True)


async def main() -> None:
    async with trio.open_nursery() as nursery:
        for label, cfg in map(config, sys.argv[1:]):
            nursery.start_soon(serve, nursery, label, cfg)


# The servers load in worker threads at once; modules imported lazily there would race (accelerate's
# import is circular), so everything they import on the way is imported first, here.
for module in ["accelerate", "bitsandbytes", "peft", *(f.module for f in FAMILIES)]:
    importlib.import_module(module)
torch.set_num_threads(1)
trio.run(main)
