"""What the HTTP layer of `mesh api` adds over the Python API, in one run on one swarm.

Starts 3 `mesh serve` processes with SmolLM2-135M-Instruct (10 blocks each) on loopback and one client
model in this process, whose node also runs the API (`serve_api`, the code behind `mesh api`) on a loopback
port. Then, alternately, the same chat prompt is answered greedily:
  - through the Python API (`model.stream`, what a Python user would call instead),
  - through HTTP, streamed, read by a plain HTTP client (httpx, one kept-alive connection): the HTTP layer,
  - through HTTP with the `openai` package, streamed: the same plus that package's own work per request.
Per path: the median time to the first token (request start to the first token's text in hand) and the
median decode rate after it. Printed: each; per HTTP path, round by round against the Python API, the time
it adds to the first token (ms) and the ratio of the decode rates (targets: at most 5 ms, at least 0.97x);
and the HTTP layer alone: per HTTP request, the client's time to its first token minus the server's own
from the request's arrival (the API's request records), which no drift of the swarm can blur.

    .venv/bin/python bench/api.py [--rounds 30] [--tokens 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from functools import partial

import httpx
import openai

from mesh import DistributedModelForCausalLM
from mesh.cli.localswarm import LocalSwarm
from mesh.model.chat import encode_messages
from mesh.web.app import serve_api

PROMPTS = ["Write a short history of the printing press.", "Describe how a steam engine works.",
           "Explain why the sky is blue.", "What makes a good cup of tea?"]


def python_api(model, prompt: str, tokens: int) -> tuple[float, float, int]:
    """(seconds to the first token, tokens/s after it, tokens) through `model.stream`."""
    t0 = time.perf_counter()
    ids = encode_messages(model.tokenizer, [{"role": "user", "content": prompt}])
    stamps = [time.perf_counter() for _ in model.stream(ids, max_new_tokens=tokens)]
    return stamps[0] - t0, (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps)


def plain_http(client: httpx.Client, name: str, prompt: str, tokens: int) -> tuple[float, float, int]:
    """The same through HTTP, its server-sent events read as they come."""
    t0 = time.perf_counter()
    stamps, count = [], 0
    body = {"model": name, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": tokens, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                count = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
    return stamps[0] - t0, (count - 1) / (stamps[-1] - stamps[0]), count


def openai_api(client: openai.OpenAI, name: str, prompt: str, tokens: int) -> tuple[float, float, int]:
    """The same through the `openai` package: times of the chunks that carry text, tokens counted by the
    server."""
    t0 = time.perf_counter()
    stamps, count = [], 0
    stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                            temperature=0, max_tokens=tokens, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            count = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
    # a chunk can carry two tokens' text (a character split across tokens): rate by the server's count
    return stamps[0] - t0, (count - 1) / (stamps[-1] - stamps[0]), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    with LocalSwarm("smollm2", 30, servers=3) as swarm:
        with DistributedModelForCausalLM.from_pretrained("smollm2", swarm.initial_peers, verify=0) as model:
            ready, url = threading.Event(), []
            model.client.start_task(_serve, partial(serve_api, model, {"smollm2"}, "127.0.0.1", 0,
                                                    on_ready=lambda u: (url.append(u), ready.set())))
            assert ready.wait(30), "the API did not start"
            client = openai.OpenAI(base_url=f"{url[0]}/v1", api_key="-", max_retries=0, timeout=120)
            plain = httpx.Client(base_url=url[0], timeout=120)
            paths = {"python": lambda p, n: python_api(model, p, n),
                     "http": lambda p, n: plain_http(plain, "smollm2", p, n),
                     "openai": lambda p, n: openai_api(client, "smollm2", p, n)}
            for run in paths.values():  # warm every path
                run(PROMPTS[0], 4)
            rows: dict[str, list[tuple[float, float, int]]] = {p: [] for p in paths}
            for r in range(args.rounds):
                names = list(paths)
                for path in names[r % 3:] + names[:r % 3]:  # each path first in turn
                    rows[path].append(paths[path](PROMPTS[r % len(PROMPTS)], args.tokens))
            # the API's own record of each request: when its first token was in hand, inside the server
            served = [q for q in plain.get("/api/swarm").json()["requests"] if q["status"] == 200]
            inside = [q["first_token_s"] for q in reversed(served)][-2 * args.rounds:]
    report(rows, inside, args.rounds)


async def _serve(serve, task_status) -> None:
    task_status.started()
    await serve()


def report(rows: dict[str, list[tuple[float, float, int]]], inside: list[float], rounds: int) -> None:
    ttft = {p: statistics.median(r[0] for r in runs) for p, runs in rows.items()}
    rate = {p: statistics.median(r[1] for r in runs) for p, runs in rows.items()}
    print(f"{'path':<8} {'first token ms (median)':>24} {'tokens/s after it (median)':>27} {'runs':>5}")
    for p in rows:
        print(f"{p:<8} {ttft[p] * 1000:>24.1f} {rate[p]:>27.1f} {len(rows[p]):>5}")
    for p in ("http", "openai"):  # round by round: the swarm's drift between rounds cancels
        added = statistics.median(h[0] - b[0] for h, b in zip(rows[p], rows["python"])) * 1000
        ratio = statistics.median(h[1] / b[1] for h, b in zip(rows[p], rows["python"]))
        print(f"{p}: adds {added:+.1f} ms to the first token (median of {rounds} paired rounds; target <= 5 ms) "
              f"and runs at {ratio:.3f}x the Python API's tokens/s (target >= 0.97)")
    # the same requests seen from both ends: what the client waited beyond the server's first token
    if len(inside) == 2 * rounds:
        outside = _in_request_order(rows, rounds)
        layer = sorted((o - i) * 1000 for o, i in zip(outside, inside))
        print(f"HTTP layer alone (the client's first token minus the server's own from arrival, same request; {len(layer)} "
              f"requests): median {statistics.median(layer):.1f} ms, p90 {layer[int(0.9 * len(layer))]:.1f} ms")


def _in_request_order(rows: dict[str, list[tuple[float, float, int]]], rounds: int) -> list[float]:
    """The HTTP paths' first-token times in the order their requests were made."""
    out = []
    for r in range(rounds):
        names = ["python", "http", "openai"]
        out += [rows[p][r][0] for p in names[r % 3:] + names[:r % 3] if p != "python"]
    return out


if __name__ == "__main__":
    main()
