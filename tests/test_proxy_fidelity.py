"""The proxy through the real path: bastion, OpenSSH reverse forward, aiohttp dev server.

Covers WebSocket relaying, server-sent events, hostile and malformed input, routing by
query parameter, cookie and baggage, CORS preflights and slow-client limits. Each test
starts a `BastionServer` in this process and a dev server behind a real ``sshd`` forward.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import attrs
import pytest
import structlog
from aiohttp import web

from ephemwork.bastion.connections import ConnectionLimits, parse_trusted_proxy
from ephemwork.bastion.proxy import ProxyTimeouts
from helpers.bastion_path import RequestPath, path_options
from helpers.sshd import SshdServer

ROUTE = {"X-Ephemwork": "alice:api"}

COOKIE_COUNT = 12
CHUNKS = [b"first chunk;", b"", b"x" * 70000, b"last"]
GZIP_BODY = gzip.compress(b"compressed by the dev server " * 100, mtime=0)
DOCUMENT = b"a document of known length\n" * 10


@attrs.define
class DevServer:
    """What the test dev server received."""

    requests: list[web.Request] = attrs.Factory(list)
    websocket_closes: list[int | None] = attrs.Factory(list)
    second_event: asyncio.Event = attrs.Factory(asyncio.Event)
    # The client address of each request: one per TCP connection the dev server accepted.
    peers: list[object] = attrs.Factory(list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/sse", self.sse)
        app.router.add_get("/ws", self.websocket)
        app.router.add_get("/ws-close", self.websocket_close)
        app.router.add_get("/ws-cookie", self.websocket_cookie)
        app.router.add_get("/status/{code}", self.status)
        app.router.add_get("/cookies", self.cookies)
        app.router.add_get("/chunked", self.chunked)
        app.router.add_get("/gzip", self.gzip)
        app.router.add_get("/document", self.document)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        return app

    async def echo(self, request: web.Request) -> web.Response:
        self.requests.append(request)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.peers.append(peer)
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "path_qs": request.raw_path,
                "headers": dict(request.headers),
                "body": body.decode("latin-1"),
            }
        )

    async def status(self, request: web.Request) -> web.Response:
        self.requests.append(request)
        return web.Response(status=int(request.match_info["code"]), reason="Totally Fine")

    async def sse(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        # The test sets this only after it has read the first event through the proxy.
        await asyncio.wait_for(self.second_event.wait(), 10)
        await response.write(b"data: second\n\n")
        await response.write_eof()
        return response

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        self.requests.append(request)
        websocket = web.WebSocketResponse(protocols=("vite-hmr",))
        await websocket.prepare(request)
        async for message in websocket:
            if message.type == aiohttp.WSMsgType.TEXT:
                await websocket.send_str(f"echo:{message.data}")
            elif message.type == aiohttp.WSMsgType.BINARY:
                await websocket.send_bytes(message.data[::-1])
        self.websocket_closes.append(websocket.close_code)
        return websocket

    async def websocket_cookie(self, request: web.Request) -> web.WebSocketResponse:
        self.requests.append(request)
        websocket = web.WebSocketResponse()
        websocket.headers.add("Set-Cookie", "hmr=1; Path=/")
        websocket.headers.add("X-Dev-Server", "vite")
        await websocket.prepare(request)
        await websocket.close()
        return websocket

    async def cookies(self, request: web.Request) -> web.Response:
        self.requests.append(request)
        response = web.Response(text="cookies")
        for index in range(COOKIE_COUNT):
            response.headers.add("Set-Cookie", f"c{index}=v{index}; Path=/; HttpOnly")
        return response

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request)
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in CHUNKS:
            await response.write(part)
        await response.write_eof()
        return response

    async def gzip(self, request: web.Request) -> web.Response:
        self.requests.append(request)
        return web.Response(
            body=GZIP_BODY, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"}
        )

    async def document(self, request: web.Request) -> web.Response:
        """Return a body of known length; aiohttp sends only the length for a HEAD."""
        self.requests.append(request)
        return web.Response(body=DOCUMENT, content_type="text/plain")

    async def websocket_close(self, request: web.Request) -> web.WebSocketResponse:
        self.requests.append(request)
        websocket = web.WebSocketResponse()
        await websocket.prepare(request)
        await websocket.close(code=4002, message=b"bye")
        return websocket


@pytest.fixture
async def dev() -> DevServer:
    """A dev server's record of requests, created inside the test's event loop."""
    return DevServer()


PathFactory = Callable[..., Coroutine[Any, Any, RequestPath]]


@pytest.fixture
async def make_path(tmp_path: Path, sshd: SshdServer, dev: DevServer) -> AsyncIterator[PathFactory]:
    """Start the real path with bastion option overrides; alice:api reaches the dev server."""
    paths: list[RequestPath] = []

    async def make(**overrides: object) -> RequestPath:
        path = RequestPath(sshd, path_options(tmp_path / f"state{len(paths)}", **overrides))
        await path.__aenter__()
        paths.append(path)
        await path.register("alice", "api", await path.serve_app(dev.app()))
        return path

    yield make

    for path in paths:
        await path.__aexit__(None, None, None)


@pytest.fixture
async def path(make_path: PathFactory) -> RequestPath:
    """The real path with default bastion options and CORS for http://127.0.0.1:*."""
    return await make_path(cors_allow_origins=("http://127.0.0.1:*",))


async def raw_exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes to the proxy and return everything it sends before closing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


class TestWebSocket:
    async def test_text_and_binary(self, path: RequestPath, dev: DevServer) -> None:
        """Text and binary frames travel both ways and the subprotocol is negotiated."""
        async with path.http.ws_connect(
            path.base + "/ws", headers=ROUTE, protocols=("vite-hmr",)
        ) as websocket:
            await websocket.send_str("hello")
            text = await websocket.receive(timeout=5)
            await websocket.send_bytes(b"\x00\x01\x02")
            binary = await websocket.receive(timeout=5)
            assert websocket.protocol == "vite-hmr"
        assert text.data == "echo:hello"
        assert binary.data == b"\x02\x01\x00"

    async def test_caller_close_code(self, path: RequestPath, dev: DevServer) -> None:
        """The caller's close code reaches the dev server."""
        async with path.http.ws_connect(path.base + "/ws", headers=ROUTE) as websocket:
            await websocket.send_str("x")
            await websocket.receive(timeout=5)
            await websocket.close(code=4001)
        for _ in range(100):
            if dev.websocket_closes:
                break
            await asyncio.sleep(0.05)
        assert dev.websocket_closes == [4001]

    async def test_dev_server_close_code(self, path: RequestPath) -> None:
        """The dev server's close code reaches the caller."""
        async with path.http.ws_connect(path.base + "/ws-close", headers=ROUTE) as websocket:
            message = await websocket.receive(timeout=5)
        assert message.type == aiohttp.WSMsgType.CLOSE
        assert message.data == 4002

    async def test_refused_upgrade(self, path: RequestPath) -> None:
        """A dev server that answers the upgrade without 101 leaves an HTTP answer."""
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await path.http.ws_connect(path.base + "/status/403", headers=ROUTE)
        assert caught.value.status == 403

    async def test_h2c_refused(self, path: RequestPath, dev: DevServer) -> None:
        """Upgrade: h2c gets 400 and nothing reaches the dev server."""
        raw = await raw_exchange(
            path.proxy_port,
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Ephemwork: alice:api\r\n"
            b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
        )
        assert status_of(raw) == 400
        assert dev.requests == []

    async def test_idle_timeout(self, make_path: PathFactory) -> None:
        """A WebSocket with no frames for the idle timeout is closed with 1001."""
        path = await make_path(proxy_timeouts=ProxyTimeouts(websocket_idle=0.5))
        async with path.http.ws_connect(path.base + "/ws", headers=ROUTE) as websocket:
            message = await websocket.receive(timeout=5)
        assert message.type == aiohttp.WSMsgType.CLOSE
        assert message.data == 1001

    async def test_cookie_route(self, path: RequestPath) -> None:
        """A WebSocket handshake routed by the ephemwork cookie reaches the dev server."""
        async with path.http.ws_connect(
            path.base + "/ws", headers={"Cookie": "theme=dark; ephemwork=alice:api"}
        ) as websocket:
            await websocket.send_str("via cookie")
            message = await websocket.receive(timeout=5)
        assert message.data == "echo:via cookie"


class TestServerSentEvents:
    async def test_event_by_event(self, path: RequestPath, dev: DevServer) -> None:
        """The first event arrives before the dev server writes the second."""
        async with path.http.get(path.base + "/sse", headers=ROUTE) as response:
            first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)
            sent_second_early = dev.second_event.is_set()
            dev.second_event.set()
            second = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)
        assert first == b"data: first\n\n"
        assert not sent_second_early
        assert second == b"data: second\n\n"


# Raw requests that must be rejected before anything reaches the dev server.
HOSTILE_REQUESTS = [
    (
        "content_length_and_chunked",
        b"POST / HTTP/1.1\r\nHost: x\r\nX-Ephemwork: alice:api\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "gzip_then_chunked",
        b"POST / HTTP/1.1\r\nHost: x\r\nX-Ephemwork: alice:api\r\n"
        b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "http10_chunked",
        b"POST / HTTP/1.0\r\nHost: x\r\nX-Ephemwork: alice:api\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "two_content_lengths",
        b"POST / HTTP/1.1\r\nHost: x\r\nX-Ephemwork: alice:api\r\nContent-Length: 1\r\n"
        b"Content-Length: 2\r\n\r\nab",
        400,
    ),
    ("nul_in_route", b"GET / HTTP/1.1\r\nHost: x\r\nX-Ephemwork: alice:a\x00pi\r\n\r\n", 400),
    ("cr_in_route", b"GET / HTTP/1.1\r\nHost: x\r\nX-Ephemwork: alice:a\rpi\r\n\r\n", 400),
    ("obs_fold", b"GET / HTTP/1.1\r\nHost: x\r\nX-Ephemwork: alice:\r\n api\r\n\r\n", 400),
    ("missing_colon", b"GET / HTTP/1.1\r\nHost: x\r\nX-Ephemwork: aliceapi\r\n\r\n", 400),
    ("empty_service", b"GET / HTTP/1.1\r\nHost: x\r\nX-Ephemwork: alice:\r\n\r\n", 400),
    ("bad_characters", b"GET / HTTP/1.1\r\nHost: x\r\nX-Ephemwork: alice:a/pi\r\n\r\n", 400),
    (
        "too_long",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Ephemwork: alice:" + b"a" * 130 + b"\r\n\r\n",
        400,
    ),
    (
        "disagreeing_headers",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Ephemwork: alice:api\r\nX-Ephemwork: bob:api\r\n\r\n",
        400,
    ),
    ("purge", b"PURGE / HTTP/1.1\r\nHost: x\r\nX-Ephemwork: alice:api\r\n\r\n", 405),
    ("trace", b"TRACE / HTTP/1.1\r\nHost: x\r\nX-Ephemwork: alice:api\r\n\r\n", 405),
    ("unknown_method", b"FROB / HTTP/1.1\r\nHost: x\r\nX-Ephemwork: alice:api\r\n\r\n", 405),
]


class TestHostileInput:
    @pytest.mark.parametrize(
        ("request_bytes", "status"),
        [pytest.param(raw, status, id=name) for name, raw, status in HOSTILE_REQUESTS],
    )
    async def test_rejected(
        self, path: RequestPath, dev: DevServer, request_bytes: bytes, status: int
    ) -> None:
        """The request gets the status and never reaches the dev server."""
        raw = await raw_exchange(path.proxy_port, request_bytes)
        body = raw.partition(b"\r\n\r\n")[2]
        assert status_of(raw) == status
        assert b"request id " in body
        assert body.count(b"\n") == 1
        assert dev.requests == []

    async def test_registered_extension(self, path: RequestPath, dev: DevServer) -> None:
        """A WebDAV method is passed on."""
        async with path.http.request("PROPFIND", path.base + "/", headers=ROUTE) as response:
            assert response.status == 200
        assert len(dev.requests) == 1

    async def test_json_error(self, path: RequestPath) -> None:
        """An error answer is JSON, with the request id, when the caller accepts JSON."""
        async with path.http.get(
            path.base + "/", headers={"X-Ephemwork": "nobody:api", "Accept": "application/json"}
        ) as response:
            document = await response.json()
            request_id = response.headers["X-Request-Id"]
        assert document["status"] == 404
        assert document["error"] == "unknown_route"
        assert document["request_id"] == request_id

    async def test_request_id_logged(self, path: RequestPath) -> None:
        """The request id of an error answer appears in the bastion's log line for it."""
        with structlog.testing.capture_logs() as logs:
            async with path.http.get(path.base + "/", headers={"X-Ephemwork": "x"}) as response:
                request_id = response.headers["X-Request-Id"]
                body = await response.text()
        rejected = [entry for entry in logs if entry["event"] == "proxy.request_rejected"]
        assert request_id in body
        assert [entry["request_id"] for entry in rejected] == [request_id]

    async def test_unknown_user_and_service_identical(self, path: RequestPath) -> None:
        """Unknown user and unknown service answers are the same bytes for the same value."""
        answers = []
        for route in ("alice:web", "carol:api"):
            async with path.http.get(path.base + "/", headers={"X-Ephemwork": route}) as response:
                request_id = response.headers["X-Request-Id"]
                body = (await response.read()).replace(route.encode(), b"ROUTE")
                headers = sorted(
                    (name.lower(), "ID" if name.lower() == "x-request-id" else value)
                    for name, value in response.headers.items()
                    if name != "Date"
                )
                answers.append((response.status, body.replace(request_id.encode(), b"ID"), headers))
        assert answers[0] == answers[1]

    async def test_control_bytes_in_response(self, path: RequestPath) -> None:
        """A dev server response header with a control byte gets 502."""
        port, received = await path.serve_raw(
            b"HTTP/1.1 200 OK\r\nX-Bad: a\x01b\r\nContent-Length: 2\r\n\r\nok"
        )
        await path.register("alice", "raw", port)
        async with path.http.get(path.base + "/", headers={"X-Ephemwork": "alice:raw"}) as r:
            assert r.status == 502
        assert len(received) == 1

    async def test_latin1_in_response(self, path: RequestPath) -> None:
        """A dev server header with a Latin-1 byte gets 502 naming the header and byte."""
        port, _ = await path.serve_raw(
            b"HTTP/1.1 200 OK\r\nContent-Disposition: attachment; filename=caf\xe9.txt\r\n"
            b"Content-Length: 2\r\n\r\nok"
        )
        await path.register("alice", "raw", port)
        head, body = await raw_request(
            path.proxy_port,
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Ephemwork: alice:raw\r\nConnection: close\r\n\r\n",
        )
        assert status_of(head) == 502
        assert b"'Content-Disposition' with the byte 0xe9" in body

    async def test_utf8_in_response(self, path: RequestPath) -> None:
        """A dev server header with UTF-8 bytes reaches the caller byte for byte."""
        port, _ = await path.serve_raw(
            b"HTTP/1.1 200 OK\r\nContent-Disposition: attachment; filename=caf\xc3\xa9.txt\r\n"
            b"Content-Length: 2\r\n\r\nok"
        )
        await path.register("alice", "raw", port)
        head, _ = await raw_request(
            path.proxy_port,
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Ephemwork: alice:raw\r\nConnection: close\r\n\r\n",
        )
        assert status_of(head) == 200
        assert header_values(head, b"content-disposition") == [
            b"attachment; filename=caf\xc3\xa9.txt"
        ]

    async def test_reason_from_status(self, path: RequestPath) -> None:
        """The reason phrase comes from the status code, not from the dev server."""
        raw = await raw_exchange(
            path.proxy_port,
            b"GET /status/200 HTTP/1.1\r\nHost: x\r\nX-Ephemwork: alice:api\r\n"
            b"Connection: close\r\n\r\n",
        )
        assert raw.startswith(b"HTTP/1.1 200 OK\r\n")


class TestRouting:
    async def test_query_sets_cookie(self, path: RequestPath, dev: DevServer) -> None:
        """?ephemwork= sets the cookie and redirects to the URL without the parameter."""
        async with path.http.get(
            path.base + "/page?a=1&ephemwork=alice:api&b=%20", allow_redirects=False
        ) as response:
            assert response.status == 307
            assert response.headers["Location"] == "/page?a=1&b=%20"
            cookie = response.headers["Set-Cookie"]
        assert cookie.startswith("ephemwork=alice:api; Path=/; HttpOnly")
        assert "Domain" not in cookie
        assert dev.requests == []

    async def test_query_then_cookie(self, path: RequestPath, dev: DevServer) -> None:
        """Following the redirect, the cookie routes the request to the dev server."""
        # unsafe=True: aiohttp keeps no cookies from IP-address hosts otherwise.
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
            async with browser.get(path.base + "/page?ephemwork=alice:api&x=1") as response:
                echoed = await response.json()
        assert echoed["path_qs"] == "/page?x=1"
        assert echoed["headers"]["X-Ephemwork"] == "alice:api"

    @pytest.mark.parametrize(
        ("target", "location"),
        [
            ("//evil.example/?ephemwork=alice:api", "/evil.example/"),
            ("/\\evil.example/?ephemwork=alice:api", "/evil.example/"),
            ("/\\/evil.example/x?next=1&ephemwork=alice:api", "/evil.example/x?next=1"),
            ("///evil.example?ephemwork=alice:api&a=1", "/evil.example?a=1"),
        ],
    )
    async def test_query_redirect_same_origin(
        self, path: RequestPath, target: str, location: str
    ) -> None:
        """A path starting with // or /\\ redirects to a path on this host, not to another."""
        head, _ = await raw_request(
            path.proxy_port,
            f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        assert status_of(head) == 307
        assert header_values(head, b"location") == [location.encode()]

    @pytest.mark.parametrize(
        "baggage",
        [
            "ephemwork=alice:api",
            "userId=7, ephemwork = alice%3Aapi ;prop=1",
            "a=b,ephemwork=alice%3aapi",
        ],
    )
    async def test_baggage(self, path: RequestPath, baggage: str) -> None:
        """A baggage member ephemwork=alice:api routes, in any position and encoding."""
        async with path.http.get(path.base + "/", headers={"baggage": baggage}) as response:
            assert response.status == 200

    async def test_precedence(self, path: RequestPath) -> None:
        """The header wins over baggage, and baggage over the cookie."""
        cases = [
            ({"X-Ephemwork": "bob:api", "baggage": "ephemwork=alice:api"}, 404),
            ({"baggage": "ephemwork=bob:api", "Cookie": "ephemwork=alice:api"}, 404),
            ({"baggage": "ephemwork=alice:api", "Cookie": "ephemwork=bob:api"}, 200),
        ]
        statuses = []
        for headers, _ in cases:
            async with path.http.get(path.base + "/", headers=headers) as response:
                statuses.append(response.status)
        assert statuses == [status for _, status in cases]


class TestCors:
    PREFLIGHT: ClassVar[dict[str, str]] = {
        "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "content-type, X-EPHEMWORK",
    }

    async def test_allowed_origin(self, make_path: PathFactory, dev: DevServer) -> None:
        """A preflight from an allowed origin is answered by the bastion itself."""
        path = await make_path(cors_allow_origins=("https://*.staging.example.com",))
        headers = {**self.PREFLIGHT, "Origin": "https://app.staging.example.com"}
        async with path.http.options(path.base + "/orders", headers=headers) as response:
            answer = response.headers
            assert response.status == 204
        assert answer["Access-Control-Allow-Origin"] == "https://app.staging.example.com"
        assert answer["Access-Control-Allow-Methods"] == "PUT"
        assert answer["Access-Control-Allow-Headers"] == "content-type, X-EPHEMWORK"
        assert answer["Access-Control-Allow-Credentials"] == "true"
        assert "Origin" in answer["Vary"]
        assert int(answer["Access-Control-Max-Age"]) > 0
        assert dev.requests == []

    async def test_other_origin(self, make_path: PathFactory) -> None:
        """A preflight from an origin not on the list gets no CORS headers."""
        path = await make_path(cors_allow_origins=("https://*.staging.example.com",))
        headers = {**self.PREFLIGHT, "Origin": "https://evil.example.com"}
        async with path.http.options(path.base + "/", headers=headers) as response:
            cors = [name for name in response.headers if name.startswith("Access-Control-")]
        assert cors == []


class TestSlowClients:
    async def test_header_timeout(self, make_path: PathFactory, dev: DevServer) -> None:
        """Headers that do not arrive within the timeout get 408 and a closed connection."""
        path = await make_path(connection_limits=ConnectionLimits(header_timeout=0.5))
        raw = await raw_exchange(path.proxy_port, b"GET / HTTP/1.1\r\nX-Ephemwork: ali")
        assert status_of(raw) == 408
        assert dev.requests == []

    async def test_keepalive_header_timeout(self, make_path: PathFactory) -> None:
        """The header timeout also applies to the second request on a keep-alive connection."""
        path = await make_path(connection_limits=ConnectionLimits(header_timeout=0.5))
        reader, writer = await asyncio.open_connection("127.0.0.1", path.proxy_port)
        writer.write(b"GET /ephemwork-health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = await reader.readuntil(b"ok")
        await asyncio.sleep(0.8)
        writer.write(b"GET / HTTP/1.1\r\nHost")
        rest = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert first.startswith(b"HTTP/1.1 200")
        assert status_of(rest) == 408

    async def test_connection_cap(self, make_path: PathFactory) -> None:
        """A client address over the connection cap gets 503 on the extra connection."""
        path = await make_path(connection_limits=ConnectionLimits(max_per_client=2))
        held = [await asyncio.open_connection("127.0.0.1", path.proxy_port) for _ in range(2)]
        raw = await raw_exchange(path.proxy_port, b"GET /ephemwork-health HTTP/1.1\r\n\r\n")
        for _, writer in held:
            writer.close()
        assert status_of(raw) == 503
        assert b"2 connections" in raw

    @pytest.mark.parametrize(
        ("forwarded_for", "status"),
        [
            pytest.param("203.0.113.1", 503, id="same_client"),
            pytest.param("203.0.113.2", 200, id="other_client"),
            pytest.param("198.51.100.7, 203.0.113.1", 503, id="spoofed_left_entry"),
            pytest.param("203.0.113.1, 127.0.0.9", 503, id="trusted_hop_skipped"),
        ],
    )
    async def test_connection_cap_per_forwarded_client(
        self, make_path: PathFactory, forwarded_for: str, status: int
    ) -> None:
        """Behind a trusted proxy, the cap counts the right-most untrusted X-Forwarded-For."""
        path = await make_path(
            connection_limits=ConnectionLimits(
                max_per_client=2, trusted_proxies=(parse_trusted_proxy("127.0.0.0/8"),)
            )
        )
        held = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", path.proxy_port)
            writer.write(
                b"GET /ephemwork-health HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.1\r\n\r\n"
            )
            await asyncio.wait_for(reader.readuntil(b"ok"), 5)
            held.append(writer)

        raw = await raw_exchange(
            path.proxy_port,
            b"GET /ephemwork-health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            + f"X-Forwarded-For: {forwarded_for}\r\n\r\n".encode(),
        )
        for writer in held:
            writer.close()

        assert status_of(raw) == status

    async def test_keepalive_timeout(self, make_path: PathFactory) -> None:
        """An idle keep-alive connection is closed after the keep-alive timeout."""
        path = await make_path(connection_limits=ConnectionLimits(keepalive_timeout=0.5))
        reader, writer = await asyncio.open_connection("127.0.0.1", path.proxy_port)
        writer.write(b"GET /ephemwork-health HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.readuntil(b"ok")
        rest = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert rest == b""


async def raw_request(port: int, request: bytes) -> tuple[bytes, bytes]:
    """Send one raw request with ``Connection: close``; return the response head and body."""
    raw = await raw_exchange(port, request)
    head, _, body = raw.partition(b"\r\n\r\n")
    return head, body


def header_values(head: bytes, name: bytes) -> list[bytes]:
    """Return the values of header *name* (lower case) in a raw response head, in order."""
    values = []
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            values.append(value.strip())
    return values


class TestMessageFraming:
    async def test_expect_continue(self, path: RequestPath, dev: DevServer) -> None:
        """A body sent after ``100 Continue`` reaches the dev server and the answer follows."""
        reader, writer = await asyncio.open_connection("127.0.0.1", path.proxy_port)
        writer.write(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nX-Ephemwork: alice:api\r\n"
            b"Content-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.write(b"hello")
        final = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        head, _, body = final.partition(b"\r\n\r\n")
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        assert status_of(head) == 200
        assert b'"body": "hello"' in body

    async def test_head(self, path: RequestPath, dev: DevServer) -> None:
        """HEAD gets the GET's Content-Length and no body."""
        head, body = await raw_request(
            path.proxy_port,
            b"HEAD /document HTTP/1.1\r\nHost: x\r\nX-Ephemwork: alice:api\r\n"
            b"Connection: close\r\n\r\n",
        )
        assert status_of(head) == 200
        assert header_values(head, b"content-length") == [str(len(DOCUMENT)).encode()]
        assert body == b""
        assert dev.requests[0].method == "HEAD"

    @pytest.mark.parametrize("code", [204, 304])
    async def test_no_body_statuses(self, path: RequestPath, code: int) -> None:
        """204 and 304 arrive without a body and without chunked framing."""
        head, body = await raw_request(
            path.proxy_port,
            f"GET /status/{code} HTTP/1.1\r\nHost: x\r\nX-Ephemwork: alice:api\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        assert status_of(head) == code
        assert header_values(head, b"transfer-encoding") == []
        assert body == b""

    async def test_no_body_keepalive(self, path: RequestPath) -> None:
        """After a 204 the same connection carries the next request's answer intact."""
        reader, writer = await asyncio.open_connection("127.0.0.1", path.proxy_port)
        writer.write(
            b"GET /status/204 HTTP/1.1\r\nHost: x\r\nX-Ephemwork: alice:api\r\n\r\n"
            b"GET /document HTTP/1.1\r\nHost: x\r\nX-Ephemwork: alice:api\r\n"
            b"Connection: close\r\n\r\n"
        )
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        first, _, rest = raw.partition(b"\r\n\r\n")
        second, _, body = rest.partition(b"\r\n\r\n")
        assert status_of(first) == 204
        assert status_of(second) == 200
        assert body == DOCUMENT

    async def test_many_set_cookie(self, path: RequestPath) -> None:
        """Every Set-Cookie header arrives separately and in order."""
        async with path.http.get(path.base + "/cookies", headers=ROUTE) as response:
            cookies = response.headers.getall("Set-Cookie")
        assert cookies == [f"c{index}=v{index}; Path=/; HttpOnly" for index in range(COOKIE_COUNT)]

    @pytest.mark.parametrize(
        "target",
        [
            "/caf%C3%A9/%E2%82%AC?q=%E2%82%AC&name=J%c3%bcrgen",
            "/a%2Fb/c%20d?next=%2Fhome%3Fx%3D1&plus=a+b&empty=&flag",
            "/%7Euser/%41?%26=%3D#",
        ],
    )
    async def test_encoded_target(self, path: RequestPath, target: str) -> None:
        """A percent-encoded path and query reach the dev server byte for byte."""
        expected = target.rstrip("#")
        head, body = await raw_request(
            path.proxy_port,
            f"GET {expected} HTTP/1.1\r\nHost: x\r\nX-Ephemwork: alice:api\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        assert status_of(head) == 200
        assert json.loads(body)["path_qs"] == expected

    async def test_raw_utf8_target(self, path: RequestPath, dev: DevServer) -> None:
        """A target with bytes outside ASCII, which HTTP/1.1 forbids, gets 400 at the bastion."""
        head, _ = await raw_request(
            path.proxy_port,
            "GET /café/€?q=ü HTTP/1.1\r\nHost: x\r\nX-Ephemwork: alice:api\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        assert status_of(head) == 400
        assert dev.requests == []

    async def test_chunked_request(self, path: RequestPath, dev: DevServer) -> None:
        """A chunked request body reaches the dev server whole."""
        raw = await raw_exchange(
            path.proxy_port,
            b"POST /upload HTTP/1.1\r\nHost: x\r\nX-Ephemwork: alice:api\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b"5\r\nhello\r\n1\r\n,\r\n6\r\n world\r\n0\r\n\r\n",
        )
        body = json.loads(raw.partition(b"\r\n\r\n")[2])
        assert status_of(raw) == 200
        assert body["body"] == "hello, world"
        assert dev.requests[0].headers.get("Transfer-Encoding") == "chunked"

    async def test_chunked_response(self, path: RequestPath) -> None:
        """A chunked response arrives chunked and whole."""
        async with path.http.get(path.base + "/chunked", headers=ROUTE) as response:
            encoding = response.headers.get("Transfer-Encoding")
            body = await response.read()
        assert encoding == "chunked"
        assert body == b"".join(CHUNKS)

    async def test_keepalive_reused(self, path: RequestPath, dev: DevServer) -> None:
        """Sequential requests to one route reuse one connection to the dev server."""
        for index in range(5):
            async with path.http.get(path.base + f"/{index}", headers=ROUTE) as response:
                assert response.status == 200
                await response.read()
        assert len(dev.peers) == 5
        assert len(set(dev.peers)) == 1

    async def test_compressed_untouched(self, path: RequestPath, dev: DevServer) -> None:
        """A gzip body and its Content-Encoding pass through as the dev server sent them."""
        async with aiohttp.ClientSession(auto_decompress=False) as client:
            async with client.get(
                path.base + "/gzip", headers={**ROUTE, "Accept-Encoding": "gzip"}
            ) as response:
                body = await response.read()
                encoding = response.headers.get("Content-Encoding")
        assert encoding == "gzip"
        assert body == GZIP_BODY
        assert dev.requests[0].headers.get("Accept-Encoding") == "gzip"


class TestWebSocketHandshake:
    HANDSHAKE = (
        b"GET /ws-cookie HTTP/1.1\r\nHost: x\r\nX-Ephemwork: alice:api\r\n"
        b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    )

    async def read_head(self, port: int, extra: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(self.HANDSHAKE + extra + b"\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
        return head

    async def test_dev_server_headers(self, path: RequestPath) -> None:
        """The dev server's Set-Cookie and custom headers on its 101 reach the caller."""
        head = await self.read_head(path.proxy_port, b"")
        assert status_of(head) == 101
        assert header_values(head, b"set-cookie") == [b"hmr=1; Path=/"]
        assert header_values(head, b"x-dev-server") == [b"vite"]
        assert header_values(head, b"sec-websocket-accept") == [b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="]

    async def test_no_extension_unless_offered(self, path: RequestPath) -> None:
        """Sec-WebSocket-Extensions appears only when the caller offered an extension."""
        plain = await self.read_head(path.proxy_port, b"")
        offered = await self.read_head(
            path.proxy_port, b"Sec-WebSocket-Extensions: permessage-deflate\r\n"
        )
        assert header_values(plain, b"sec-websocket-extensions") == []
        assert header_values(offered, b"sec-websocket-extensions") == [b"permessage-deflate"]
