"""The live swarm dashboard: a block map, the server table and the node's recent requests, in a browser.

`GET /` is rendered on the server from one snapshot, so the page reads without JavaScript; the script in
static/ then polls `GET /api/swarm` and redraws the same elements in place. Both renderers keep the same
DOM hooks (`.server-bar[data-peer][data-start][data-end][data-state]`, `.block[data-block][data-servers]`
with `uncovered` / `thin`, `#updated`), so what a test checks is what a person sees.

Every string in a snapshot that came from a peer (names, versions, devices, model ids) is hostile input:
the page escapes it, the script only ever sets it as text, and the Content-Security-Policy admits no script
but the page's own file.
"""

from __future__ import annotations

import html
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import anyio
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from ..net.report import swarm_report
from ..net.swarm import Swarm, block_ranges
from ..net.wire import short_id
from .server import LOOPBACK, serve_http

__all__ = ["dashboard_routes", "Snapshots", "render_page", "lanes", "summary", "recent", "watcher_app",
           "keep_following", "serve_dashboard", "STATIC", "REFRESH_S"]

STATIC = Path(__file__).with_name("static")
REFRESH_S = 1.5  # how often the page polls /api/swarm (static/dashboard.js has the same figure)
MAX_REQUESTS = 50  # rows of the request table: the latest ones
STATES = ("ONLINE", "JOINING", "DRAINING", "OFFLINE")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
log = logging.getLogger("mesh.dashboard")

Snapshot = Callable[[], Awaitable[dict]]


class Snapshots:
    """The last snapshot, reused for `max_age` seconds: every open page polls, and each fresh snapshot
    pings every server, so polls share one walk of the swarm instead of multiplying the pings.

    Callers that arrive while a snapshot is being taken wait for it rather than starting their own.
    """

    def __init__(self, take: Snapshot, max_age: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._take = take
        self.max_age = max_age
        self._clock = clock
        self._lock = anyio.Lock()
        self._last: dict | None = None
        self._at = -math.inf

    async def __call__(self) -> dict:
        async with self._lock:
            if self._last is None or self._clock() - self._at > self.max_age:
                snap = dict(await self._take())
                snap.setdefault("time", time.time())
                self._last, self._at = snap, self._clock()
            return self._last


def dashboard_routes(snapshot: Snapshot, title: str = "mesh swarm") -> list[BaseRoute]:
    """`/` (the page), `/api/swarm` (the snapshot as JSON) and `/static/…` (the page's script and style)."""

    async def page(request: Request) -> Response:
        return HTMLResponse(render_page(await snapshot(), title), headers=_headers())

    async def api(request: Request) -> Response:
        return JSONResponse(await snapshot(), headers=_headers())

    return [Route("/", page, methods=["GET"]), Route("/api/swarm", api, methods=["GET"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static")]


def _headers() -> dict[str, str]:
    return {"Cache-Control": "no-store", "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"}


# --- the page, rendered on the server (static/dashboard.js renders the same elements from /api/swarm) ---

def _e(value: Any) -> str:
    """Text of a peer as HTML text or attribute value."""
    return html.escape(str(value), quote=True)


def _num(value: Any, default: float = 0.0) -> float:
    """A number from a snapshot, or `default` for anything else (a peer's fields are checked, but the page
    must not break on a snapshot built elsewhere)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return default
    return float(value)


def _clock(t: Any) -> str:
    return time.strftime("%H:%M:%S", time.localtime(_num(t, time.time())))


def lanes(servers: list[dict]) -> list[list[dict]]:
    """Servers packed into rows whose spans do not overlap, each row filled from the left: the map shows
    every server as one bar without stacking bars on one another."""
    rows: list[list[dict]] = []
    for s in sorted(servers, key=lambda s: (_num(s.get("start")), _num(s.get("end")), str(s.get("peer_id")))):
        row = next((r for r in rows if _num(r[-1].get("end")) <= _num(s.get("start"))), None)
        if row is None:
            rows.append(row := [])
        row.append(s)
    return rows


def _state(s: dict) -> str:
    state = str(s.get("state", ""))
    return state if state in STATES else "OFFLINE"


def _bar(s: dict, total: int) -> str:
    start, end = int(_num(s.get("start"))), int(_num(s.get("end")))
    state, peer = _state(s), str(s.get("peer_id", ""))
    left, width = 100 * start / total, 100 * (end - start) / total
    classes = ["server-bar", f"state-{state.lower()}"] + (["relayed"] if s.get("relayed") else []) + \
        (["caught"] if s.get("caught") else [])
    label = [str(s.get("public_name") or short_id(peer)), f"{start}:{end}"]
    label += [state.lower()] if state != "ONLINE" else []
    label += ["relayed"] if s.get("relayed") else []
    label += ["caught lying"] if s.get("caught") else []
    tip = f"{short_id(peer)}: blocks {start}:{end}, {state}, {_num(s.get('throughput')):.1f} tok/s/block"
    return (f'<div class="{" ".join(classes)}" data-peer="{_e(peer)}" data-start="{start}" data-end="{end}" '
            f'data-state="{state}" style="left:{left:.4f}%;width:{width:.4f}%" title="{_e(tip)}">'
            f'<span>{_e(" · ".join(label))}</span></div>')


def _block(b: int, count: int, tput: float) -> str:
    cls = "block" + (" uncovered" if count == 0 else " thin" if count == 1 else "")
    tip = f"block {b}: {count} server{'s' if count != 1 else ''}, {tput:.1f} tok/s"
    return f'<div class="{cls}" data-block="{b}" data-servers="{count}" title="{tip}">{b}</div>'


def summary(counts: list[int]) -> str:
    """The coverage line under a model's name (static/dashboard.js words it the same)."""
    if not counts:
        return "no blocks known"
    missing = [b for b, c in enumerate(counts) if c == 0]
    if missing:
        return f"{len(missing)} of {len(counts)} blocks uncovered: {block_ranges(missing)}"
    thin = sum(1 for c in counts if c == 1)
    return f"all {len(counts)} blocks covered" + (f", {thin} by a single server" if thin else "")


SERVER_COLUMNS = ("name", "peer", "span", "state", "tok/s/block", "RTT ms", "sessions", "batch", "device",
                  "dtype", "version", "relayed")
REQUEST_COLUMNS = ("time", "endpoint", "model", "tokens in", "tokens out", "seconds", "tokens/s", "route",
                   "status")


def _server_row(s: dict) -> str:
    peer = str(s.get("peer_id", ""))
    rtt = s.get("rtt")
    dtype = str(s.get("dtype", "")) + (f"/{s.get('quant')}" if s.get("quant", "none") not in ("none", "") else "")
    state = _state(s)
    cells = [
        _e(s.get("public_name") or "-"), f'<code title="{_e(peer)}">{_e(short_id(peer))}</code>',
        f"{int(_num(s.get('start')))}:{int(_num(s.get('end')))}",
        f'<span class="state state-{state.lower()}">{state}</span>'
        + (' <strong class="caught">caught lying</strong>' if s.get("caught") else ""),
        f"{_num(s.get('throughput')):.1f}", f"{_num(rtt) * 1000:.1f}" if _num(rtt, -1) >= 0 else "-",
        str(int(_num(s.get("sessions")))), f"{_num(s.get('batch')):.1f}" if _num(s.get("batch")) else "-",
        _e(s.get("device", "")), _e(dtype), _e(s.get("version", "")), "yes" if s.get("relayed") else "no",
    ]
    return f'<tr data-peer="{_e(peer)}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _model(m: dict) -> str:
    total = int(_num(m.get("num_blocks")))
    counts = [int(_num(c)) for c in m.get("servers_per_block") or []][:total]
    counts += [0] * (total - len(counts))
    tputs = [_num(t) for t in m.get("throughput_per_block") or []][:total]
    tputs += [0.0] * (total - len(tputs))
    servers = [s for s in m.get("servers") or [] if isinstance(s, dict)]
    ok = total > 0 and all(counts)
    out = [f'<section class="model" data-model="{_e(m.get("model_id", ""))}">',
           f'<h2>{_e(m.get("model_id", ""))} <small>{total} blocks · {len(servers)} '
           f'server{"s" if len(servers) != 1 else ""}</small></h2>',
           f'<p class="summary {"ok" if ok else "bad"}">{_e(summary(counts))}</p>']
    if total:
        out.append(f'<div class="blockmap" style="--blocks:{total}"><div class="blocks">')
        out += [_block(b, c, t) for b, (c, t) in enumerate(zip(counts, tputs))]
        out.append('</div><div class="lanes">')
        for row in lanes(servers):
            out.append('<div class="lane">' + "".join(_bar(s, total) for s in row) + "</div>")
        out.append("</div></div>")
    out.append('<table class="servers"><thead><tr>' + "".join(f"<th>{c}</th>" for c in SERVER_COLUMNS)
               + "</tr></thead><tbody>")
    out += [_server_row(s) for s in sorted(servers, key=lambda s: (_num(s.get("start")), _num(s.get("end"))))]
    if not servers:
        out.append(f'<tr class="empty"><td colspan="{len(SERVER_COLUMNS)}">no servers known</td></tr>')
    out.append("</tbody></table></section>")
    return "\n".join(out)


def _request_row(r: dict) -> str:
    status = int(_num(r.get("status")))
    cells = [_clock(r.get("time")), _e(r.get("endpoint", "")), _e(r.get("model", "")),
             str(int(_num(r.get("tokens_in")))), str(int(_num(r.get("tokens_out")))), f"{_num(r.get('seconds')):.2f}",
             f"{_num(r.get('tokens_per_s')):.1f}", _e(r.get("route", "")), str(status)]
    cls = "ok" if 200 <= status < 400 else "bad"
    return f'<tr class="{cls}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def recent(requests: Any) -> list[dict]:
    """The request rows shown: the latest MAX_REQUESTS, newest first."""
    rows = [r for r in requests or [] if isinstance(r, dict)]
    return sorted(rows, key=lambda r: _num(r.get("time")), reverse=True)[:MAX_REQUESTS]


def render_page(snap: dict, title: str = "mesh swarm") -> str:
    """The whole page for one snapshot, readable as it is (the script only keeps it current)."""
    node = snap.get("node") if isinstance(snap.get("node"), dict) else {}
    models = [m for m in snap.get("models") or [] if isinstance(m, dict)]
    requests = recent(snap.get("requests"))
    body = "\n".join(_model(m) for m in models) or '<p class="empty">no servers found yet</p>'
    rows = "\n".join(_request_row(r) for r in requests) or \
        f'<tr class="empty"><td colspan="{len(REQUEST_COLUMNS)}">no requests yet</td></tr>'
    initial = {"refresh": REFRESH_S}
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<link rel="stylesheet" href="/static/dashboard.css">
<script src="/static/dashboard.js" defer></script>
</head>
<body data-config="{_e(json.dumps(initial))}">
<header>
<h1>{_e(title)}</h1>
<p class="node">{_e(node.get("role", "node"))} <code title="{_e(node.get("peer_id", ""))}">{
        _e(short_id(node.get("peer_id", "")))}</code></p>
<p class="live">updated <time id="updated" data-refreshes="0">{_clock(snap.get("time"))}</time>
<span id="connection" class="static">snapshot</span></p>
</header>
<main>
<div id="models">
{body}
</div>
<section class="legend"><span class="swatch state-online"></span>online
<span class="swatch state-joining"></span>joining
<span class="swatch state-draining"></span>draining <span class="swatch state-offline"></span>offline
<span class="swatch relayed state-online"></span>relayed (reached through a relay)
<span class="swatch uncovered"></span>uncovered block <span class="swatch thin"></span>block with one server</section>
<section id="requests-section">
<h2>Recent requests to this node</h2>
<table id="requests"><thead><tr>{"".join(f"<th>{c}</th>" for c in REQUEST_COLUMNS)}</tr></thead>
<tbody>
{rows}
</tbody></table>
</section>
</main>
</body>
</html>
"""


# --- a node that only watches: `mesh status --web` ---

def watcher_app(swarm: Swarm, model_id: str | None = None, title: str = "mesh swarm",
                rtt_timeout: float = 1.0) -> Starlette:
    """The dashboard of a node that serves nothing: its snapshot is the swarm report, without requests."""

    async def take() -> dict:
        report = await swarm_report(swarm, model_id, rtt_timeout=rtt_timeout)
        return {**report, "requests": [], "node": {"peer_id": swarm.node.peer_id, "role": "watcher"}}

    return Starlette(routes=dashboard_routes(Snapshots(take), title))


async def keep_following(swarm: Swarm, model_id: str | None = None, period: float = 5.0) -> None:
    """Keep the table growing while the page is open: gossip keeps known models current, but a model (or,
    for a given model, a server) that appears after joining is only found by asking peers again."""
    while True:
        await trio.sleep(period)
        try:
            if model_id is not None:
                if not swarm.table.servers(model_id):
                    await swarm.discover(model_id, timeout=period)
                continue
            await swarm.snapshots_from_connected("", timeout=period)
            for mid in {i.model_id for i in swarm.table.all()}:
                await swarm.follow(mid)
        except Exception as e:  # a peer's failure never ends the watch
            log.debug("following the swarm: %s", e)


async def serve_dashboard(swarm: Swarm, model_id: str | None = None, host: str = LOOPBACK, port: int = 8000, *,
                          task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the watcher's dashboard and keep following the swarm until cancelled; reports the base URL."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_following, swarm, model_id)
        url = await nursery.start(serve_http, watcher_app(swarm, model_id), host, port)
        task_status.started(url)
