"""Headless Chromium for tests, driven over the Chrome DevTools Protocol with trio-websocket.

A page is tested as a person sees it: its script runs, its DOM is queried, its pixels saved. Chromium is
started in its own process group, found through the "DevTools listening on ws://…" line it writes to
stderr, and killed by that group whatever happens. A missing or broken Chromium is an error, not a skip.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import trio
from trio_websocket import open_websocket_url

__all__ = ["Page", "open_page", "chromium_path"]

DEVTOOLS = re.compile(r"DevTools listening on (ws://\S+)")
MAX_MESSAGE = 64 << 20  # a full-page screenshot arrives base64 in one message


def chromium_path() -> str:
    """The Chromium executable (scripts/setup.sh installs Debian's `chromium`)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise RuntimeError("chromium not found: run scripts/setup.sh as root (apt-get install chromium)")


class Page:
    """One tab, attached through the browser's DevTools connection (a flat session)."""

    def __init__(self, ws, timeout: float) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel] = {}
        self.session: str | None = None
        self.timeout = timeout

    async def _read(self) -> None:
        while True:
            msg = json.loads(await self._ws.get_message())
            if (channel := self._waiting.pop(msg.get("id"), None)) is not None:  # events have no id
                channel.send_nowait(msg)

    async def send(self, method: str, session: bool = True, **params: Any) -> dict:
        """One DevTools command; its result, or RuntimeError with the browser's error."""
        msg_id = next(self._ids)
        send, receive = trio.open_memory_channel(1)
        self._waiting[msg_id] = send
        msg = {"id": msg_id, "method": method, "params": params}
        if session and self.session:
            msg["sessionId"] = self.session
        with trio.fail_after(self.timeout):
            await self._ws.send_message(json.dumps(msg))
            reply = await receive.receive()
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def evaluate(self, js: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited), as JSON would carry it."""
        result = await self.send("Runtime.evaluate", expression=js, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(f"{js[:80]!r}: {details.get('exception', {}).get('description') or details}")
        return result["result"].get("value")

    async def wait_for(self, js: str, timeout: float) -> Any:
        """Poll a JavaScript expression until it is truthy; its value."""
        with trio.fail_after(timeout):
            while not (value := await self.evaluate(js)):
                await trio.sleep(0.1)
        return value

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for(f"location.href.startsWith({json.dumps(url)}) && document.readyState === 'complete'",
                            self.timeout)

    async def screenshot(self, path: Path | str) -> Path:
        """The whole page as a PNG."""
        size = (await self.send("Page.getLayoutMetrics"))["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


@asynccontextmanager
async def open_page(url: str, *, width: int = 1280, height: int = 800, timeout: float = 20.0
                    ) -> AsyncIterator[Page]:
    """A headless Chromium showing `url` (loaded), for the block's duration; then the browser is killed."""
    with tempfile.TemporaryDirectory(prefix="mesh-chromium-", ignore_cleanup_errors=True) as tmp:
        log = Path(tmp) / "stderr.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [chromium_path(), "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
                 f"--user-data-dir={tmp}/profile", f"--window-size={width},{height}", "--no-first-run",
                 "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            endpoint = await _devtools_endpoint(proc, log, timeout)
            async with open_websocket_url(endpoint, max_message_size=MAX_MESSAGE) as ws, \
                    trio.open_nursery() as nursery:
                page = Page(ws, timeout)
                nursery.start_soon(page._read)
                target = (await page.send("Target.createTarget", url="about:blank"))["targetId"]
                page.session = (await page.send("Target.attachToTarget", targetId=target, flatten=True))["sessionId"]
                await page.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                                deviceScaleFactor=1, mobile=False)
                await page.send("Page.enable")
                await page.goto(url)
                yield page
                nursery.cancel_scope.cancel()
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)


async def _devtools_endpoint(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    """The browser's DevTools WebSocket URL, read from its stderr; RuntimeError if it never comes."""
    try:
        with trio.fail_after(timeout):
            while not (match := DEVTOOLS.search(log.read_text(errors="replace"))):
                if proc.poll() is not None:
                    raise RuntimeError(f"chromium exited with {proc.returncode}")
                await trio.sleep(0.05)
    except (RuntimeError, trio.TooSlowError) as e:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"chromium did not start ({e or 'no DevTools endpoint within the deadline'}):\n{tail}")
    return match.group(1)
