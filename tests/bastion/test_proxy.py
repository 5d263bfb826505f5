"""Tests for the routing proxy, with real aiohttp back ends standing in for tunnel ports."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from ephemwork.bastion.proxy import (
    SMALL_BODY_MAX,
    ProxyTimeouts,
    create_proxy_app,
    upgrade_response_headers,
)
from ephemwork.bastion.registry import SessionRegistry
from ephemwork.wire import Session

BackendFactory = Callable[[web.Application], Awaitable[int]]
RegisterOnPort = Callable[..., Session]


async def echo(request: web.Request) -> web.Response:
    """Return the request as the back end saw it, as JSON."""
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "path_qs": request.raw_path,
            "headers": [[name, value] for name, value in request.headers.items()],
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "body_size": len(body),
        }
    )


def echo_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def header_values(echoed: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in echoed["headers"] if key.lower() == name.lower()]


def unused_port() -> int:
    """Return a loopback port nothing listens on (it was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Proxy:
    """A running proxy over a registry, and an HTTP client to call it."""

    def __init__(
        self,
        registry: SessionRegistry,
        http: aiohttp.ClientSession,
        base: str,
        port: int,
        register_on_port: RegisterOnPort,
    ) -> None:
        self.registry = registry
        self.http = http
        self.base = base
        self.port = port
        self._register_on_port = register_on_port

    def route(self, user: str, service: str, port: int) -> Session:
        return self._register_on_port(self.registry, user, service, port)

    async def get(
        self, path: str = "/", route: str | None = "alice:api", **kwargs: Any
    ) -> tuple[int, bytes, aiohttp.ClientResponse]:
        headers = dict(kwargs.pop("headers", {}))
        if route is not None:
            headers["X-Ephemwork"] = route
        method = kwargs.pop("method", "GET")
        async with self.http.request(
            method, self.base + path, headers=headers, allow_redirects=False, **kwargs
        ) as response:
            return response.status, await response.read(), response

    async def raw(self, request: bytes) -> bytes:
        """Send raw HTTP/1.1 bytes and return the raw response up to the close."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(request)
        await writer.drain()
        data = await reader.read()
        writer.close()
        await writer.wait_closed()
        return data


@pytest.fixture
async def proxy(
    make_registry: Callable[..., SessionRegistry],
    make_backend: BackendFactory,
    register_on_port: RegisterOnPort,
) -> AsyncIterator[Proxy]:
    registry = make_registry(port_range=(1024, 65535))
    timeouts = ProxyTimeouts(connect=2.0, read=1.0)
    port = await make_backend(create_proxy_app(registry, timeouts=timeouts))
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        yield Proxy(registry, http, f"http://127.0.0.1:{port}", port, register_on_port)


class TestOwnAnswers:
    async def test_health(self, proxy: Proxy) -> None:
        """The health path returns 200 ok without a route header."""
        status, body, _ = await proxy.get("/ephemwork-health", route=None)
        assert (status, body) == (200, b"ok")

    async def test_missing_header(self, proxy: Proxy) -> None:
        """A request without the header gets 404 saying the header is missing."""
        status, body, _ = await proxy.get(route=None)
        assert status == 404
        assert b"missing X-Ephemwork header" in body

    async def test_unknown_route(self, proxy: Proxy) -> None:
        """An unregistered route gets 404 naming the value."""
        status, body, response = await proxy.get(route="alice:api")
        request_id = response.headers["X-Request-Id"]
        assert status == 404
        assert (
            body == f"no laptop is registered for 'alice:api' (request id {request_id})\n".encode()
        )

    async def test_unknown_user_matches_unknown_service(
        self, proxy: Proxy, make_backend: BackendFactory
    ) -> None:
        """Unknown user and unknown service responses differ only in the echoed value."""
        proxy.route("alice", "api", await make_backend(echo_app()))
        _, unknown_service, first = await proxy.get(route="alice:web")
        _, unknown_user, second = await proxy.get(route="carol:api")
        first_id = first.headers["X-Request-Id"].encode()
        second_id = second.headers["X-Request-Id"].encode()
        assert unknown_service.replace(b"alice:web", b"X").replace(
            first_id, b"ID"
        ) == unknown_user.replace(b"carol:api", b"X").replace(second_id, b"ID")
        assert first.headers["Content-Type"] == second.headers["Content-Type"]
        assert sorted(first.headers) == sorted(second.headers)

    async def test_malformed(self, proxy: Proxy) -> None:
        """A malformed value gets 400 with the reason."""
        status, body, _ = await proxy.get(route="alice")
        assert status == 400
        assert b"missing ':'" in body

    async def test_disagreeing_headers(self, proxy: Proxy) -> None:
        """Two different route headers get 400."""
        headers = CIMultiDict([("X-Ephemwork", "alice:api"), ("X-Ephemwork", "bob:api")])
        async with proxy.http.get(proxy.base + "/", headers=headers) as response:
            assert response.status == 400
            assert b"disagree" in await response.read()

    async def test_tunnel_not_listening(self, proxy: Proxy) -> None:
        """A registered route whose port refuses connections gets 502 naming the route."""
        proxy.route("alice", "api", unused_port())
        status, body, _ = await proxy.get()
        assert status == 502
        assert b"the laptop's tunnel for 'alice:api' is not connected" in body

    async def test_read_timeout(self, proxy: Proxy, make_backend: BackendFactory) -> None:
        """A tunnel that sends no response headers within the read timeout gets 504."""
        never = asyncio.Event()

        async def stall(request: web.Request) -> web.Response:
            await never.wait()
            return web.Response()

        app = web.Application()
        app.router.add_get("/", stall)
        proxy.route("alice", "api", await make_backend(app))
        try:
            status, body, _ = await proxy.get()
        finally:
            never.set()
        assert status == 504
        assert b"tunnel for 'alice:api' timed out" in body


class TestForwarding:
    async def test_routes_to_backend(self, proxy: Proxy, make_backend: BackendFactory) -> None:
        """A registered route reaches its back end with method, path and query intact."""
        proxy.route("alice", "api", await make_backend(echo_app()))
        status, body, _ = await proxy.get("/a%2Fb/c?x=1&y=%20", method="DELETE")
        echoed = json.loads(body)
        assert status == 200
        assert echoed["method"] == "DELETE"
        assert echoed["path_qs"] == "/a%2Fb/c?x=1&y=%20"

    async def test_routes_by_service(self, proxy: Proxy, make_backend: BackendFactory) -> None:
        """Two services of one user reach two different back ends."""

        def named(name: str) -> web.Application:
            async def answer(request: web.Request) -> web.Response:
                return web.Response(text=name)

            app = web.Application()
            app.router.add_get("/", answer)
            return app

        proxy.route("alice", "api", await make_backend(named("api")))
        proxy.route("alice", "web", await make_backend(named("web")))
        assert (await proxy.get(route="alice:web"))[1] == b"web"

    async def test_forwarded_headers(self, proxy: Proxy, make_backend: BackendFactory) -> None:
        """X-Forwarded-For is appended to, Proto and Host are set, X-Ephemwork is kept."""
        proxy.route("alice", "api", await make_backend(echo_app()))
        _, body, _ = await proxy.get(
            headers={"X-Forwarded-For": "192.0.2.7", "Host": "staging.example:8443"}
        )
        echoed = json.loads(body)
        assert header_values(echoed, "X-Forwarded-For") == ["192.0.2.7, 127.0.0.1"]
        assert header_values(echoed, "X-Forwarded-Proto") == ["http"]
        assert header_values(echoed, "X-Forwarded-Host") == ["staging.example:8443"]
        assert header_values(echoed, "X-Ephemwork") == ["alice:api"]

    async def test_load_balancer_proto_kept(
        self, proxy: Proxy, make_backend: BackendFactory
    ) -> None:
        """An X-Forwarded-Proto set by the load balancer in front is passed on."""
        proxy.route("alice", "api", await make_backend(echo_app()))
        _, body, _ = await proxy.get(headers={"X-Forwarded-Proto": "https"})
        assert header_values(json.loads(body), "X-Forwarded-Proto") == ["https"]

    async def test_request_hop_by_hop(self, proxy: Proxy, make_backend: BackendFactory) -> None:
        """Hop-by-hop request headers and those named in Connection are not forwarded."""
        proxy.route("alice", "api", await make_backend(echo_app()))
        raw = await proxy.raw(
            b"GET / HTTP/1.1\r\n"
            b"Host: staging.example\r\n"
            b"X-Ephemwork: alice:api\r\n"
            b"Connection: close, X-Hop\r\n"
            b"X-Hop: secret\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"TE: trailers\r\n"
            b"Trailer: X-Checksum\r\n"
            b"Upgrade: websocket\r\n"
            b"X-End-To-End: kept\r\n"
            b"\r\n"
        )
        echoed = json.loads(raw.partition(b"\r\n\r\n")[2])
        names = {name.lower() for name, _ in echoed["headers"]}
        for hop in ("x-hop", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"):
            assert hop not in names, hop
        assert header_values(echoed, "Connection") != ["close, X-Hop"]
        assert header_values(echoed, "X-End-To-End") == ["kept"]

    async def test_no_added_accept_encoding(
        self, proxy: Proxy, make_backend: BackendFactory
    ) -> None:
        """The proxy adds no Accept-Encoding that the caller did not send."""
        proxy.route("alice", "api", await make_backend(echo_app()))
        raw = await proxy.raw(
            b"GET / HTTP/1.1\r\nHost: h\r\nX-Ephemwork: alice:api\r\nConnection: close\r\n\r\n"
        )
        echoed = json.loads(raw.partition(b"\r\n\r\n")[2])
        assert header_values(echoed, "Accept-Encoding") == []

    async def test_response_headers(self, proxy: Proxy, make_backend: BackendFactory) -> None:
        """Repeated Set-Cookie headers survive and hop-by-hop response headers do not."""

        async def cookies(request: web.Request) -> web.Response:
            response = web.Response(text="ok")
            response.headers.add("Set-Cookie", "a=1; Path=/")
            response.headers.add("Set-Cookie", "b=2; Path=/")
            response.headers["Connection"] = "X-Internal"
            response.headers["X-Internal"] = "secret"
            response.headers["Keep-Alive"] = "timeout=5"
            return response

        app = web.Application()
        app.router.add_get("/", cookies)
        proxy.route("alice", "api", await make_backend(app))
        _, _, response = await proxy.get()
        assert response.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
        assert "X-Internal" not in response.headers
        assert "Keep-Alive" not in response.headers

    async def test_cookies_not_shared(self, proxy: Proxy, make_backend: BackendFactory) -> None:
        """A cookie set by one response is not sent with the next request."""

        async def set_cookie(request: web.Request) -> web.Response:
            response = await echo(request)
            response.set_cookie("session", "alice-secret")
            return response

        app = web.Application()
        app.router.add_get("/", set_cookie)
        proxy.route("alice", "api", await make_backend(app))
        await proxy.get()
        _, body, _ = await proxy.get()
        assert header_values(json.loads(body), "Cookie") == []

    async def test_redirect_relayed(self, proxy: Proxy, make_backend: BackendFactory) -> None:
        """A redirect is relayed to the caller, not followed."""

        async def redirect(request: web.Request) -> web.Response:
            raise web.HTTPFound("/elsewhere")

        app = web.Application()
        app.router.add_get("/", redirect)
        proxy.route("alice", "api", await make_backend(app))
        status, _, response = await proxy.get()
        assert status == 302
        assert response.headers["Location"] == "/elsewhere"

    async def test_encoded_body_untouched(self, proxy: Proxy, make_backend: BackendFactory) -> None:
        """A gzip body reaches the caller as the back end encoded it."""
        payload = gzip.compress(b"hello " * 1000)

        async def gzipped(request: web.Request) -> web.Response:
            return web.Response(body=payload, headers={"Content-Encoding": "gzip"})

        app = web.Application()
        app.router.add_get("/", gzipped)
        proxy.route("alice", "api", await make_backend(app))
        _, body, response = await proxy.get(headers={"Accept-Encoding": "gzip"})
        assert body == payload
        assert response.headers["Content-Encoding"] == "gzip"

    @pytest.mark.parametrize("size", [0, 1, SMALL_BODY_MAX, SMALL_BODY_MAX + 1])
    async def test_sized_response_body(
        self, proxy: Proxy, make_backend: BackendFactory, size: int
    ) -> None:
        """Sized bodies on both sides of the whole-body limit arrive whole, headers kept."""
        payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)

        async def sized(request: web.Request) -> web.Response:
            return web.Response(body=payload, headers={"X-Dev": "1", "Content-Type": "a/b"})

        app = web.Application()
        app.router.add_get("/", sized)
        proxy.route("alice", "api", await make_backend(app))
        status, body, response = await proxy.get()
        assert status == 200
        assert body == payload
        assert response.headers["Content-Length"] == str(size)
        assert response.headers["X-Dev"] == "1"
        assert response.headers["Content-Type"] == "a/b"

    async def test_large_request_body(self, proxy: Proxy, make_backend: BackendFactory) -> None:
        """A 20 MiB chunked upload arrives whole."""
        proxy.route("alice", "api", await make_backend(echo_app()))
        chunk = bytes(range(256)) * 4096
        digest = hashlib.sha256(chunk * 20).hexdigest()

        async def body() -> AsyncIterator[bytes]:
            for _ in range(20):
                yield chunk

        _, data, _ = await proxy.get(method="POST", data=body())
        echoed = json.loads(data)
        assert echoed["body_size"] == 20 * len(chunk)
        assert echoed["body_sha256"] == digest

    async def test_sized_request_body(self, proxy: Proxy, make_backend: BackendFactory) -> None:
        """A request body with Content-Length arrives whole, with its length header."""
        proxy.route("alice", "api", await make_backend(echo_app()))
        payload = b"x" * 300_000
        _, data, _ = await proxy.get(method="POST", data=payload)
        echoed = json.loads(data)
        assert echoed["body_size"] == len(payload)
        assert header_values(echoed, "Content-Length") == [str(len(payload))]

    async def test_head(self, proxy: Proxy, make_backend: BackendFactory) -> None:
        """A HEAD request gets the back end's headers and no body."""

        async def sized(request: web.Request) -> web.Response:
            return web.Response(body=b"y" * 1234)

        app = web.Application()
        app.router.add_get("/", sized)
        proxy.route("alice", "api", await make_backend(app))
        status, body, response = await proxy.get(method="HEAD")
        assert status == 200
        assert body == b""
        assert response.headers["Content-Length"] == "1234"

    async def test_request_body_streamed(self, proxy: Proxy, make_backend: BackendFactory) -> None:
        """The back end receives the first upload chunk before the caller sends the second."""
        first_seen = asyncio.Event()

        async def read_two(request: web.Request) -> web.Response:
            first = await request.content.readexactly(5)
            first_seen.set()
            rest = await request.content.read()
            return web.Response(body=first + rest)

        app = web.Application()
        app.router.add_post("/", read_two)
        proxy.route("alice", "api", await make_backend(app))

        async def body() -> AsyncIterator[bytes]:
            yield b"first"
            # Deadlocks (and times out) if the proxy buffered the whole request body.
            await asyncio.wait_for(first_seen.wait(), 5)
            yield b"-second"

        _, data, _ = await proxy.get(method="POST", data=body())
        assert data == b"first-second"

    async def test_response_body_streamed(self, proxy: Proxy, make_backend: BackendFactory) -> None:
        """The caller receives the first response chunk before the back end sends the second."""
        first_received = asyncio.Event()

        async def two_chunks(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(b"data: one\n\n")
            await first_received.wait()
            await response.write(b"data: two\n\n")
            await response.write_eof()
            return response

        app = web.Application()
        app.router.add_get("/", two_chunks)
        proxy.route("alice", "api", await make_backend(app))

        headers = {"X-Ephemwork": "alice:api"}
        async with proxy.http.get(proxy.base + "/", headers=headers) as response:
            first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)
            first_received.set()
            rest = await response.content.read()
        assert first == b"data: one\n\n"
        assert rest == b"data: two\n\n"

    async def test_tunnel_drops_mid_body(self, proxy: Proxy, make_backend: BackendFactory) -> None:
        """A tunnel that drops during the body makes the caller see a broken body."""

        async def half(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Length": "1000"})
            await response.prepare(request)
            await response.write(b"x" * 10)
            assert request.transport is not None
            request.transport.abort()
            return response

        app = web.Application()
        app.router.add_get("/", half)
        proxy.route("alice", "api", await make_backend(app))
        with pytest.raises(aiohttp.ClientPayloadError):
            await proxy.get()


class TestUpgradeResponseHeaders:
    def test_end_to_end_kept(self) -> None:
        """Set-Cookie (repeated) and custom headers of a 101 are kept in order."""
        headers = CIMultiDict([("Set-Cookie", "a=1"), ("X-Dev", "vite"), ("Set-Cookie", "b=2")])
        kept = list(upgrade_response_headers(CIMultiDictProxy(headers)))
        assert kept == [("Set-Cookie", "a=1"), ("X-Dev", "vite"), ("Set-Cookie", "b=2")]

    def test_handshake_dropped(self) -> None:
        """Hop-by-hop, Sec-WebSocket-* and body headers of a 101 are left out."""
        headers = CIMultiDict(
            [
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade, X-Hop"),
                ("X-Hop", "1"),
                ("Sec-WebSocket-Accept", "abc"),
                ("Sec-WebSocket-Extensions", "permessage-deflate"),
                ("sec-websocket-protocol", "vite-hmr"),
                ("Content-Length", "0"),
                ("Content-Type", "text/plain"),
            ]
        )
        assert list(upgrade_response_headers(CIMultiDictProxy(headers))) == []
