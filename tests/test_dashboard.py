"""The dashboard's page, JSON and static files for a given snapshot, served in-process (no swarm, no browser).

The page must read without JavaScript (the block map and both tables are in the HTML), carry the hooks the
script and the browser test rely on, and escape every string a peer announced.
"""

from __future__ import annotations

import json
from html.parser import HTMLParser

import httpx
import trio
from starlette.applications import Starlette

from mesh.web.dashboard import Snapshots, dashboard_routes, lanes, render_page

HOSTILE = "<script>alert(1)</script>"
ATTR_BREAK = '"><img src=x onerror=alert(2)>'


def server(peer: str, start: int, end: int, **extra) -> dict:
    base = {"peer_id": peer, "model_id": "tiny", "start": start, "end": end, "state": "ONLINE", "addrs": [],
            "throughput": 10.0, "inference_rps": 0.0, "forward_rps": 0.0, "network_rps": 0.0,
            "cache_tokens_free": 1000, "sessions": 0, "batch": 0.0, "dtype": "float32", "device": "cpu",
            "quant": "none", "version": "0.1.0", "public_name": "", "relayed": False, "next_pings": {},
            "adapters": [], "total_blocks": 8, "timestamp": 0.0, "ttl": 3.0, "rtt": 0.0012, "caught": None}
    return {**base, **extra}


SNAPSHOT = {
    "models": [{
        "model_id": "tiny", "num_blocks": 8, "covered": False, "missing_blocks": [6, 7],
        "servers_per_block": [1, 1, 1, 2, 2, 1, 0, 0], "throughput_per_block": [10, 10, 10, 20, 20, 10, 0, 0],
        "servers": [
            server("12D3KooWAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", 0, 3, public_name=HOSTILE),
            server("12D3KooWBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB", 3, 6, relayed=True, version=ATTR_BREAK),
            server("12D3KooWCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCC", 3, 5, state="DRAINING", quant="nf4",
                   rtt=None, device=f"cuda {HOSTILE}"),
        ],
    }],
    "requests": [
        {"time": 1700000000.0, "endpoint": "/v1/chat/completions", "model": "tiny", "tokens_in": 12,
         "tokens_out": 20, "seconds": 1.5, "tokens_per_s": 13.3, "route": "…AAAA → …BBBB", "status": 200},
        {"time": 1700000005.0, "endpoint": HOSTILE, "model": "tiny", "tokens_in": 3, "tokens_out": 0,
         "seconds": 0.1, "tokens_per_s": 0.0, "route": "", "status": 503},
    ],
    "node": {"peer_id": "12D3KooWNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNN", "role": "api"},
}


class Elements(HTMLParser):
    """Every element's tag, attributes and the text directly inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.items: list[dict] = []
        self._open: list[dict] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        item = {"tag": tag, **{k: v or "" for k, v in attrs}, "text": ""}
        self.items.append(item)
        if tag not in ("meta", "link", "br", "img", "input"):
            self._open.append(item)

    def handle_endtag(self, tag: str) -> None:
        while self._open and self._open.pop()["tag"] != tag:
            pass

    def handle_data(self, data: str) -> None:
        for item in self._open:
            item["text"] += data

    def having(self, cls: str) -> list[dict]:
        return [i for i in self.items if cls in i.get("class", "").split()]


def parse(page: str) -> Elements:
    parser = Elements()
    parser.feed(page)
    return parser


def client(snapshot) -> httpx.AsyncClient:
    app = Starlette(routes=dashboard_routes(snapshot, "test swarm"))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://dashboard")


async def fixed() -> dict:
    return SNAPSHOT


async def test_page_draws_the_block_map_and_tables_without_javascript():
    async with client(fixed) as http:
        reply = await http.get("/")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in reply.headers["content-security-policy"]
    page = parse(reply.text)

    bars = page.having("server-bar")
    assert sorted((b["data-peer"][-4:], b["data-start"], b["data-end"], b["data-state"]) for b in bars) == [
        ("AAAA", "0", "3", "ONLINE"), ("BBBB", "3", "6", "ONLINE"), ("CCCC", "3", "5", "DRAINING")]
    relayed = [b for b in bars if "relayed" in b["class"].split()]
    assert [b["data-peer"][-4:] for b in relayed] == ["BBBB"] and "relayed" in relayed[0]["text"]
    first = next(b for b in bars if b["data-peer"].endswith("AAAA"))
    assert "left:0.0000%;width:37.5000%" in first["style"]

    blocks = sorted(page.having("block"), key=lambda b: int(b["data-block"]))
    assert [b["data-servers"] for b in blocks] == ["1", "1", "1", "2", "2", "1", "0", "0"]
    assert [int(b["data-block"]) for b in blocks if "uncovered" in b["class"].split()] == [6, 7]
    assert [int(b["data-block"]) for b in blocks if "thin" in b["class"].split()] == [0, 1, 2, 5]
    assert "2 of 8 blocks uncovered: 6:8" in reply.text

    # 3:6 and 3:5 overlap: two lanes, so no bar hides another
    assert len(page.having("lane")) == 2
    rows = [i for i in page.items if i["tag"] == "tr" and i.get("data-peer")]
    assert len(rows) == 3
    draining = next(r for r in rows if r["data-peer"].endswith("CCCC"))
    assert "DRAINING" in draining["text"] and "float32/nf4" in draining["text"]
    assert next(r for r in rows if r["data-peer"].endswith("AAAA"))["text"].count("1.2") >= 1  # RTT in ms

    requests = [i for i in page.items if i["tag"] == "tr" and i.get("class") in ("ok", "bad")]
    assert [r["class"] for r in requests] == ["bad", "ok"]  # newest first; the 503 marked
    assert "/v1/chat/completions" in requests[1]["text"] and "13.3" in requests[1]["text"]
    assert [i for i in page.items if i.get("id") == "updated"]
    assert [i["src"] for i in page.items if i["tag"] == "script"] == ["/static/dashboard.js"]


async def test_peer_strings_are_escaped():
    page = render_page(SNAPSHOT)
    assert HOSTILE not in page and ATTR_BREAK not in page and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&quot;&gt;&lt;img src=x onerror=alert(2)&gt;" in page
    parsed = parse(page)
    assert [i["src"] for i in parsed.items if i["tag"] == "script"] == ["/static/dashboard.js"]
    assert not [i for i in parsed.items if any(k.startswith("on") for k in i)]
    names = [i["text"] for i in parsed.items if i["tag"] == "td"]
    assert HOSTILE in names  # shown as the text it is


async def test_json_and_static_files():
    async with client(fixed) as http:
        swarm = await http.get("/api/swarm")
        script = await http.get("/static/dashboard.js")
        style = await http.get("/static/dashboard.css")
        outside = await http.get("/static/../dashboard.py")
        missing = await http.get("/static/nothing.js")
    assert swarm.status_code == 200 and swarm.json() == json.loads(json.dumps(SNAPSHOT))
    assert swarm.headers["cache-control"] == "no-store"
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "/api/swarm" in script.text and "server-bar" in script.text
    assert style.status_code == 200 and ".server-bar" in style.text
    assert outside.status_code == 404 and missing.status_code == 404


async def test_empty_swarm_page():
    page = render_page({"models": [], "requests": [], "node": {"peer_id": "x", "role": "watcher"}})
    assert "no servers found yet" in page and "no requests yet" in page
    page = parse(render_page({"models": [{"model_id": "m", "num_blocks": 0, "servers": []}]}))
    assert not page.having("block") and not page.having("server-bar")


async def test_snapshots_are_shared_while_fresh():
    now = [0.0]
    calls = []

    async def take() -> dict:
        calls.append(now[0])
        await trio.sleep(0.05)  # callers arriving meanwhile wait for this one
        return {"models": [], "n": len(calls)}

    snaps = Snapshots(take, max_age=1.0, clock=lambda: now[0])
    got = []

    async def one() -> None:
        got.append((await snaps())["n"])

    async with trio.open_nursery() as n:
        for _ in range(5):
            n.start_soon(one)
    assert got == [1] * 5 and len(calls) == 1
    now[0] = 0.9
    assert (await snaps())["n"] == 1
    now[0] = 1.5
    snap = await snaps()
    assert snap["n"] == 2 and isinstance(snap["time"], float)


def test_lanes_keep_bars_apart():
    spans = [(0, 2), (2, 4), (2, 4), (0, 4), (3, 4)]
    rows = lanes([{"peer_id": str(i), "start": a, "end": b} for i, (a, b) in enumerate(spans)])
    for row in rows:
        for left, right in zip(row, row[1:]):
            assert left["end"] <= right["start"]
    assert sum(len(r) for r in rows) == len(spans) and len(rows) == 4  # four spans hold block 3
