"""`mesh api` over a real swarm, driven by the `openai` package: three `mesh serve` processes of a tiny
random Llama that speaks SmolLM2's tokenizer (so text goes in and out), and a `mesh api` process."""

from __future__ import annotations

import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make_tiny
from mesh.model.chat import encode_messages
from procs import MeshProcess, run_mesh, serve

pytestmark = pytest.mark.e2e

KEY = "sk-test-key"
PROMPT = "Name three colours."
READY = re.compile(r"^mesh api: (http://\S+)/v1 ", re.M)


@pytest.fixture(scope="module")
def talker(smollm2, tmp_path_factory):
    """A tiny random Llama over SmolLM2's vocabulary, with SmolLM2's tokenizer and chat template."""
    folder = tmp_path_factory.mktemp("talker") / "talker"
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2.path))
    model = make_tiny("llama", layers=6)
    model.resize_token_embeddings(len(tokenizer))
    model.config.max_position_embeddings = 4096
    torch.manual_seed(1)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 1)
        model.lm_head.weight.normal_(0, 1)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (smollm2.path / name).exists():
            shutil.copy(smollm2.path / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def api(talker, tmp_path_factory):
    """(base URL, initial peer, folder) of `mesh api` over servers of blocks 0:2, 2:4 and 4:6."""
    logs = tmp_path_factory.mktemp("api-logs")
    procs = [serve(talker, "0:2", logs / "s0.log")]
    try:
        boot = procs[0].wait_ready_sync()
        procs += [serve(talker, span, logs / f"s{i}.log", [boot]) for i, span in ((1, "2:4"), (2, "4:6"))]
        for p in procs:
            p.wait_ready_sync()
        front = MeshProcess(["api", str(talker), "--port", "0", "--api-key", KEY, "--initial-peers", boot,
                             "--verify", "0"], logs / "api.log", env={"HF_HUB_OFFLINE": "1"})
        procs.append(front)
        deadline = time.monotonic() + 90
        while not (match := READY.search(front.output())):
            assert front.proc.poll() is None, front.output()[-3000:]
            assert time.monotonic() < deadline, front.output()[-3000:]
            time.sleep(0.1)
        yield match.group(1), boot, talker, front
    finally:
        for p in procs:
            p.cleanup()


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def reference(folder, ids: torch.Tensor, n: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


async def test_greedy_chat_equals_mesh_generate_streamed_or_not(api):
    url, boot, folder, _ = api
    done = await run_mesh("generate", str(folder), "-p", PROMPT, "-n", "12", "--initial-peers", boot,
                          "--verify", "0", timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    expected = done.stdout.decode().removesuffix("\n")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = encode_messages(tokenizer, [{"role": "user", "content": PROMPT}])
    assert expected == tokenizer.decode(reference(folder, ids, 12), skip_special_tokens=True)

    messages = [{"role": "user", "content": PROMPT}]
    whole = client(url).chat.completions.create(model=str(folder), messages=messages, temperature=0, max_tokens=12)
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (ids.shape[1], 12)

    pieces, finish, usage = [], None, None
    for chunk in client(url).chat.completions.create(model=str(folder), messages=messages, temperature=0,
                                                     max_tokens=12, stream=True,
                                                     stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == expected and len([p for p in pieces if p]) > 1
    assert finish == "length" and usage.completion_tokens == 12


def test_completions_seed_stop_and_max_tokens(api):
    url, _, folder, _ = api
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer("Once upon a time", return_tensors="pt")["input_ids"]
    text = tokenizer.decode(reference(folder, ids, 20), skip_special_tokens=True)
    c = client(url)
    whole = c.completions.create(model=str(folder), prompt="Once upon a time", temperature=0, max_tokens=20)
    assert whole.choices[0].text == text

    short = c.completions.create(model=str(folder), prompt="Once upon a time", temperature=0, max_tokens=5)
    assert short.usage.completion_tokens == 5 and short.choices[0].finish_reason == "length"
    assert text.startswith(short.choices[0].text)

    sampled = [c.completions.create(model=str(folder), prompt="Once upon a time", temperature=1.0, top_p=0.9,
                                    max_tokens=12, seed=seed).choices[0].text for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]  # a seed of the request's own, whatever else runs

    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = text[:text.index(stop)]
    for stream in (False, True):
        got = c.completions.create(model=str(folder), prompt="Once upon a time", temperature=0, max_tokens=20,
                                   stop=[stop], stream=stream)
        chunks = list(got) if stream else [got]
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == cut, stream
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"


def test_four_concurrent_streams_complete(api):
    url, _, folder, _ = api
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    prompts = [f"Tell me about the number {i}." for i in range(4)]

    def expected(p: str) -> str:
        ids = encode_messages(tokenizer, [{"role": "user", "content": p}])
        return tokenizer.decode(reference(folder, ids, 24), skip_special_tokens=True)

    def ask(p: str) -> str:
        stream = client(url).chat.completions.create(model=str(folder), messages=[{"role": "user", "content": p}],
                                                     temperature=0, max_tokens=24, stream=True)
        return "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, prompts))
    assert answers == [expected(p) for p in prompts]


def test_bad_requests_get_openai_errors_and_the_api_keeps_serving(api):
    url, _, folder, _ = api
    c = client(url)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=str(folder), messages=[{"role": "user", "content": "hi"}], max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").models.list()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body in (b"{not json", b"[1, 2]", b'{"model": 5}', b"{}"):
        r = httpx.post(f"{url}/v1/chat/completions", content=body, headers=headers, timeout=30)
        assert r.status_code == 400, body
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(f"{url}/v1/completions", content=b"x" * (2 << 20), headers=headers, timeout=30)
    assert r.status_code == 413
    assert [m.id for m in c.models.list()].count(str(folder)) == 1
    ok = c.chat.completions.create(model=str(folder), messages=[{"role": "user", "content": "hi"}], temperature=0,
                                   max_tokens=3)
    assert ok.usage.completion_tokens == 3


def test_closing_a_stream_early_frees_the_servers_sessions(api):
    """The servers count the session while the answer streams, and drop it within a few announcement
    periods of the client leaving, long before the 2000 tokens it asked for."""
    url, _, folder, front = api

    def swarm() -> dict:
        return httpx.get(f"{url}/api/swarm", timeout=30).json()

    def sessions() -> int:
        return sum(s["sessions"] for m in swarm()["models"] for s in m["servers"])

    deadline = time.monotonic() + 20
    while sessions() > 0:  # earlier tests' sessions have ended
        assert time.monotonic() < deadline
        time.sleep(0.2)
    stream = client(url).chat.completions.create(model=str(folder), messages=[{"role": "user", "content": "Go"}],
                                                 temperature=0, max_tokens=2000, stream=True)
    chunks = iter(stream)
    while sessions() < 3:  # one per server, announced within a period
        next(chunks)
        assert time.monotonic() < deadline
    stream.close()
    left = time.monotonic()
    while sessions() > 0:
        assert time.monotonic() - left < 6, swarm()
        time.sleep(0.2)
    last = swarm()["requests"][0]
    assert last["status"] == 499 and 0 < last["tokens_out"] < 1000, last
    assert "499 /v1/chat/completions" in front.output()


def test_the_dashboard_shows_the_swarm_and_this_apis_requests(api):
    """The API's own port serves the dashboard: a bar per server over its span, and the requests it answered."""
    url, _, folder, _ = api
    client(url).completions.create(model=str(folder), prompt="Hello", temperature=0, max_tokens=2)
    page = httpx.get(f"{url}/", timeout=30).text
    bars = sorted(re.findall(r'class="server-bar[^"]*"[^>]*data-start="(\d+)" data-end="(\d+)"', page))
    assert bars == [("0", "2"), ("2", "4"), ("4", "6")], page[:2000]
    assert "/v1/completions" in page
    assert httpx.get(f"{url}/static/dashboard.js", timeout=30).status_code == 200
