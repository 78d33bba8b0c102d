"""A swarm client for the network lab: runs inside a lab host's namespace, prints one JSON line.

    python tests/labclient.py MODEL --peer ADDR [--prompt-ids 1,2,3] [--new-tokens 32] [--runs 1]
        [--direct-wait S [--direct-peer ID]] [--chat --prompt-text TEXT] [--speculate off|auto|K] [--draft MODEL]

Generates greedily through the swarm from token ids and reports, per run, the tokens, the time of each
new token after the first, and how this client is connected to each server ("direct" or "relayed"); then
every server's counters.
With --direct-wait, waits up to S seconds after the first run for every connection (or those to the
--direct-peer ones) to become direct (DCUtR) before the next run.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mesh import DistributedModelForCausalLM
from mesh.model.chat import encode_messages
from mesh.net.client import server_info
from mesh.net.relay import is_relayed


def links(model) -> dict[str, str]:
    out = {}
    for peer, conns in model.client.node.host.get_network().connections.items():
        conns = conns if isinstance(conns, list) else [conns]
        out[peer.to_base58()] = "direct" if any(not is_relayed(c) for c in conns) else "relayed"
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--peer", action="append", required=True)
    p.add_argument("--prompt-ids", default="1,2,3,4,5,6,7,8")
    p.add_argument("--prompt-text", default="")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--direct-wait", type=float, default=0.0)
    p.add_argument("--direct-peer", action="append", default=[], help="wait for these peers only (repeatable)")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--chat", action="store_true", help="wrap --prompt-text in the chat template; stop at EOS")
    p.add_argument("--speculate", default="off")
    p.add_argument("--draft", default=None)
    a = p.parse_args()
    with DistributedModelForCausalLM.from_pretrained(a.model, a.peer, timeout=a.timeout, exact=True) as model:
        model.use_speculation(a.speculate, a.draft)
        if a.chat:
            ids = encode_messages(model.tokenizer, [{"role": "user", "content": a.prompt_text}])
        elif a.prompt_text:
            ids = model.tokenizer(a.prompt_text, return_tensors="pt")["input_ids"]
        else:
            ids = torch.tensor([[int(t) for t in a.prompt_ids.split(",")]])
        runs = []
        for i in range(a.runs):
            if i == 1 and a.direct_wait:
                deadline = time.monotonic() + a.direct_wait
                while time.monotonic() < deadline and any(
                        link == "relayed" and (not a.direct_peer or peer in a.direct_peer)
                        for peer, link in links(model).items()):
                    time.sleep(0.5)
            stamps: list[float] = []
            with model.inference_session(ids.shape[1] + a.new_tokens) as session:
                t0 = time.perf_counter()
                out = model.generate(ids, max_new_tokens=a.new_tokens, eos_token_id=None if a.chat else [],
                                     session=session, on_token=lambda _: stamps.append(time.perf_counter()))
                spec = session.generator.speculator
            runs.append({"tokens": out[0, ids.shape[1]:].tolist(), "links": links(model),
                         "step_s": [b - t for t, b in zip(stamps, stamps[1:])], "seconds": stamps[-1] - t0,
                         "passes": spec.passes if spec else len(stamps), "drafted": spec.drafted if spec else 0,
                         "accepted": spec.accepted if spec else 0})
        counters = {}  # each server's counters after the runs (pushes sent, and how many through a relay)
        for info in model.client.swarm.table.servers(model.source.model_id):
            counters[info.peer_id] = model.client.call(server_info, model.client.node, info.peer_id).counters
    print(json.dumps({"runs": runs, "counters": counters}), flush=True)


if __name__ == "__main__":
    main()
