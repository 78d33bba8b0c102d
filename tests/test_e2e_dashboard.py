"""`mesh status --web` over a live swarm, seen in headless Chromium: the block map shows each server over
its span, and when the only server of some blocks is killed, the same open page (no reload) turns those
blocks uncovered within the announcements' TTL.

Screenshots land in test-artifacts/ at the repository root. Without a working Chromium the test fails:
scripts/setup.sh installs it.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest
import trio

from browser import open_page
from conftest import make_tiny
from procs import MeshProcess, serve

pytestmark = pytest.mark.e2e

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
DASHBOARD = re.compile(r"^dashboard: (http://\S+/)$", re.M)
TTL = 3.0  # s: `mesh serve --announce-period 1` (tests/procs.py) announces a TTL of 3 periods

BARS = "[...document.querySelectorAll('.server-bar')].map(b => [b.dataset.peer, +b.dataset.start, +b.dataset.end, " \
       "b.dataset.state]).sort((a, b) => a[1] - b[1] || a[0].localeCompare(b[0]))"
BLOCKS = "[...document.querySelectorAll('.block')].map(b => [+b.dataset.block, +b.dataset.servers, " \
         "b.classList.contains('uncovered'), b.classList.contains('thin')])"
REFRESHES = "+document.getElementById('updated').dataset.refreshes"


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dash") / "dash4"
    make_tiny("llama", layers=4).save_pretrained(folder)
    return folder


async def test_dashboard_follows_the_swarm(tiny4, tmp_path):
    procs: list[MeshProcess] = []
    try:
        # the watcher joins through a server of 2:4, which stays up; 0:2 has a single server, killed later
        first = serve(tiny4, "2:4", tmp_path / "b.log")
        procs.append(first)
        boot = await first.wait_ready()
        procs += [serve(tiny4, "0:2", tmp_path / "a.log", [boot]), serve(tiny4, "2:4", tmp_path / "c.log", [boot])]
        for p in procs[1:]:
            await p.wait_ready()
        lone, pair = procs[1], sorted([procs[0].peer_id, procs[2].peer_id])
        watcher = MeshProcess(["status", str(tiny4), "--web", "--port", "0", "--initial-peers", boot, "--timeout",
                               "5"], tmp_path / "web.log", env={"HF_HUB_OFFLINE": "1"})
        procs.append(watcher)
        with trio.fail_after(30):
            while not (match := DASHBOARD.search(watcher.output())):
                assert watcher.proc.poll() is None, watcher.output()[-3000:]
                await trio.sleep(0.1)
        url = match.group(1)

        async with open_page(url) as page:
            # the script refreshed the page from /api/swarm, and the map holds one bar per server over its span
            await page.wait_for(f"{REFRESHES} >= 1", 10)
            want = [[lone.peer_id, 0, 2, "ONLINE"]] + [[peer, 2, 4, "ONLINE"] for peer in pair]
            with trio.move_on_after(15):
                while await page.evaluate(BARS) != want:
                    await trio.sleep(0.2)
            assert await page.evaluate(BARS) == want, watcher.output()[-2000:]
            assert await page.evaluate(BLOCKS) == [[0, 1, False, True], [1, 1, False, True], [2, 2, False, False],
                                                   [3, 2, False, False]]
            assert await page.evaluate("document.getElementById('connection').textContent") == "live"
            rows = await page.evaluate("[...document.querySelectorAll('table.servers tr[data-peer]')].length")
            assert rows == 3
            await page.screenshot(ARTIFACTS / "dashboard.png")

            # SIGKILL: no goodbye; the entry expires after the TTL and the open page redraws without it
            await page.evaluate("window.sameDocument = true")
            refreshes = await page.evaluate(REFRESHES)
            lone.signal(signal.SIGKILL)
            t0 = time.monotonic()
            gone = "(() => { const b = [...document.querySelectorAll('.block')]; " \
                   "return b.length === 4 && b[0].classList.contains('uncovered') " \
                   "&& b[1].classList.contains('uncovered'); })()"
            await page.wait_for(gone, TTL + 10)
            elapsed = time.monotonic() - t0
            assert elapsed < TTL + 5, elapsed  # TTL, plus a poll, the snapshot cache and a ping's timeout
            assert await page.evaluate("window.sameDocument === true")  # redrawn in place, not reloaded
            assert await page.evaluate(REFRESHES) > refreshes
            assert await page.evaluate(BARS) == [[peer, 2, 4, "ONLINE"] for peer in pair]
            assert await page.evaluate(BLOCKS) == [[0, 0, True, False], [1, 0, True, False], [2, 2, False, False],
                                                   [3, 2, False, False]]
            summary = await page.evaluate("document.querySelector('.summary').textContent")
            assert summary == "2 of 4 blocks uncovered: 0:2"
            await page.screenshot(ARTIFACTS / "dashboard-uncovered.png")

            # SIGTERM ends the watch cleanly; the page says it lost its source and keeps the last map
            watcher.signal(signal.SIGTERM)
            assert await watcher.wait_exit(10) == 0, watcher.output()[-2000:]
            await page.wait_for("document.getElementById('connection').textContent === 'disconnected'", 10)
            assert len(await page.evaluate(BARS)) == 2
    finally:
        for p in procs:
            p.cleanup()
