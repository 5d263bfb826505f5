"""A real browser through the bastion: headless Chromium driven over the DevTools protocol.

Chromium (Debian's ``chromium``) runs with a fresh profile and its DevTools endpoint on
127.0.0.1, and the tests drive it with aiohttp's WebSocket client. In one, a page from one
loopback origin calls the bastion on another with ``fetch()`` and the route header, so the
browser sends a CORS preflight first. In the other, a page routed by the ``ephemwork``
cookie opens a WebSocket through the bastion. The bastion runs in this process and reaches
the dev server through a real OpenSSH reverse forward.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest
import structlog
from aiohttp import web

from helpers.bastion_path import RequestPath, path_options
from helpers.repo import skip_or_fail
from helpers.sshd import SshdServer

# The page's origin differs from the bastion's (127.0.0.1) by its address.
PAGE_HOST = "127.0.0.2"

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--remote-debugging-port=0",
)

# Seconds for Chromium to start, and for one DevTools command or event.
START_TIMEOUT = 20.0
STEP_TIMEOUT = 10.0

FETCH_SCRIPT = """
(async () => {
  const response = await fetch(%(url)s, {
    method: "PUT",
    headers: {"X-Ephemwork": "alice:api", "Content-Type": "application/json"},
    body: JSON.stringify({from: "browser"}),
  });
  return {status: response.status, body: await response.json()};
})()
"""

WEBSOCKET_SCRIPT = """
new Promise((resolve, reject) => {
  const socket = new WebSocket(%(url)s);
  const received = [];
  socket.onopen = () => socket.send("first");
  socket.onmessage = (event) => {
    received.push(event.data);
    if (received.length === 1) socket.send("second");
    else socket.close(1000);
  };
  socket.onclose = (event) => resolve({received, code: event.code});
  socket.onerror = () => reject(new Error("WebSocket error"));
})
"""


@attrs.define
class DevServer:
    """A dev server that records requests, echoes JSON and WebSocket text, and serves a page."""

    requests: list[tuple[str, str, str | None]] = attrs.Factory(list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ws", self.websocket)
        app.router.add_get("/page", self.page)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        return app

    async def echo(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path, request.headers.get("X-Ephemwork")))
        return web.json_response({"method": request.method, "body": await request.json()})

    async def page(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path, request.headers.get("X-Ephemwork")))
        return web.Response(
            text='<!doctype html><link rel=icon href="data:,"><title>dev</title>',
            content_type="text/html",
        )

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        self.requests.append((request.method, request.path, request.headers.get("X-Ephemwork")))
        websocket = web.WebSocketResponse()
        await websocket.prepare(request)
        async for message in websocket:
            if message.type == aiohttp.WSMsgType.TEXT:
                await websocket.send_str(f"echo:{message.data}")
        return websocket


class DevTools:
    """A DevTools protocol session with one page target over a WebSocket."""

    _websocket: aiohttp.ClientWebSocketResponse
    _ids: Iterator[int]
    _events: list[dict[str, Any]]

    def __init__(self, websocket: aiohttp.ClientWebSocketResponse) -> None:
        self._websocket = websocket
        self._ids = itertools.count(1)
        self._events = []

    async def call(self, method: str, **params: object) -> dict[str, Any]:
        """Send a command and return its result; events that arrive meanwhile are kept."""
        command_id = next(self._ids)
        await self._websocket.send_json({"id": command_id, "method": method, "params": params})
        while True:
            message = await self._receive()
            if message.get("id") == command_id:
                if "error" in message:
                    raise AssertionError(f"DevTools {method} failed: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result
            self._events.append(message)

    async def wait_for_event(self, method: str) -> dict[str, Any]:
        """Return the first event named *method*, received earlier or now."""
        while True:
            for index, event in enumerate(self._events):
                if event.get("method") == method:
                    del self._events[index]
                    return event
            self._events.append(await self._receive())

    async def navigate(self, url: str) -> None:
        """Load *url* in the page and wait for its load event."""
        self._events.clear()
        await self.call("Page.navigate", url=url)
        await self.wait_for_event("Page.loadEventFired")

    async def evaluate(self, expression: str) -> Any:
        """Evaluate *expression* in the page, await its promise and return its value."""
        result = await self.call(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"the page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def _receive(self) -> dict[str, Any]:
        message = await self._websocket.receive(timeout=STEP_TIMEOUT)
        assert message.type == aiohttp.WSMsgType.TEXT, f"DevTools connection ended: {message}"
        document: dict[str, Any] = json.loads(message.data)
        return document


def find_chromium() -> str:
    """Return the path of Chromium, or skip the test (fail it under CI)."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path is not None:
            return path
    skip_or_fail("chromium is not installed; scripts/test.sh installs the Debian package chromium")


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """Headless Chromium with a fresh profile; yields the process and its profile folder."""
    profile = tmp_path / "chromium-profile"
    with (tmp_path / "chromium.log").open("wb") as log:
        process = subprocess.Popen(
            [find_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
    yield process, profile
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
async def devtools(
    chromium: tuple[subprocess.Popen[bytes], Path],
) -> AsyncIterator[DevTools]:
    """A DevTools session with Chromium's first page, with page events enabled."""
    process, profile = chromium
    # With --remote-debugging-port=0 Chromium writes the port it chose into this file.
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + START_TIMEOUT
    while not port_file.exists() or not port_file.read_text().strip():
        assert process.poll() is None, f"chromium exited with {process.returncode}"
        assert time.monotonic() < deadline, "chromium opened no DevTools port"
        await asyncio.sleep(0.05)
    port = int(port_file.read_text().split()[0])

    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json()
        page = next(target for target in targets if target["type"] == "page")
        async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as websocket:
            session = DevTools(websocket)
            await session.call("Page.enable")
            yield session


@pytest.fixture
async def dev() -> DevServer:
    """The dev server's record, created inside the test's event loop."""
    return DevServer()


@pytest.fixture
async def path(tmp_path: Path, sshd: SshdServer, dev: DevServer) -> AsyncIterator[RequestPath]:
    """The real path with CORS for the page's origin; alice:api reaches the dev server."""
    options = path_options(tmp_path / "state", cors_allow_origins=(f"http://{PAGE_HOST}:*",))
    async with RequestPath(sshd, options) as request_path:
        await request_path.register("alice", "api", await request_path.serve_app(dev.app()))
        yield request_path


@pytest.fixture
async def page_origin() -> AsyncIterator[str]:
    """A server on 127.0.0.2 that serves an empty page; yields its origin."""
    app = web.Application()

    async def index(request: web.Request) -> web.Response:
        return web.Response(
            text="<!doctype html><title>front end</title>", content_type="text/html"
        )

    app.router.add_get("/", index)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, PAGE_HOST, 0)
    await site.start()
    yield f"http://{PAGE_HOST}:{runner.addresses[0][1]}"
    await runner.cleanup()


class TestBrowser:
    async def test_cross_origin_fetch(
        self, devtools: DevTools, path: RequestPath, dev: DevServer, page_origin: str
    ) -> None:
        """fetch() with the route header from another origin: preflight, then the dev server."""
        await devtools.navigate(page_origin + "/")
        script = FETCH_SCRIPT % {"url": json.dumps(path.base + "/orders")}

        with structlog.testing.capture_logs() as logs:
            result = await devtools.evaluate(script)
        preflights = [entry for entry in logs if entry["event"] == "proxy.preflight_answered"]

        assert [(entry["origin"], entry["method"]) for entry in preflights] == [
            (page_origin, "PUT")
        ]
        assert result == {"status": 200, "body": {"method": "PUT", "body": {"from": "browser"}}}
        # The bastion responded to the preflight itself, so only the PUT reached the dev server.
        assert dev.requests == [("PUT", "/orders", "alice:api")]

    async def test_websocket_by_cookie(
        self, devtools: DevTools, path: RequestPath, dev: DevServer
    ) -> None:
        """A page routed by ?ephemwork= opens a WebSocket that the cookie routes."""
        await devtools.navigate(path.base + "/page?ephemwork=alice:api")
        location = await devtools.evaluate("location.href")
        script = WEBSOCKET_SCRIPT % {"url": json.dumps(path.base.replace("http", "ws") + "/ws")}

        result = await devtools.evaluate(script)

        assert location == path.base + "/page"
        assert result == {"received": ["echo:first", "echo:second"], "code": 1000}
        assert dev.requests == [("GET", "/page", "alice:api"), ("GET", "/ws", "alice:api")]
