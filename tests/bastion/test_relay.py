"""The relay through a real `BastionServer` and a raw dev server, over loopback sockets.

Each test starts a bastion in this process, registers ``alice:api`` and serves a raw
asyncio dev server on the session's tunnel port, so every byte on both sides is under the
test's control. The dev server sends no ``Server`` header. aiohttp adds one to every response
it sends and the relay adds none, so a response without one was sent by the relay.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import attrs
import pytest

from ephemwork.bastion.connections import ConnectionLimits
from ephemwork.bastion.proxy import ProxyTimeouts
from ephemwork.bastion.server import BastionServer
from ephemwork.wire import RegisterRequest
from helpers.bastion_path import path_options

ROUTE = "alice:api"
CALLER_HOST = "staging.example.com"
# Seconds any single read in these tests may take before the test fails. It is far above
# what a loopback exchange needs, so it only bounds a hang.
DEADLINE = 10.0
MIB = 1024 * 1024


# The dev server.


@attrs.define
class Received:
    """One request as the dev server read it."""

    # The request line and headers, including the blank line that ends them.
    head: bytes
    body: bytes
    # 0 for the dev server's first accepted connection, 1 for the next one, and so on.
    connection: int
    # 0 for the first request on its connection.
    sequence: int

    @property
    def method(self) -> bytes:
        return self.head.split(b" ", 1)[0]

    @property
    def target(self) -> bytes:
        return self.head.split(b" ", 2)[1]

    def values(self, name: bytes) -> list[bytes]:
        """Return the values of header *name* (any case), in order."""
        return header_values(self.head.split(b"\r\n")[1:], name)


# A handler writes the response to one request and returns False to close the connection.
Handler = Callable[[Received, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


def http_response(
    body: bytes = b"", *, headers: tuple[bytes, ...] = (b"Content-Type: text/plain",)
) -> bytes:
    """Return a whole 200 response with *headers* in order, then Content-Length."""
    lines = [b"HTTP/1.1 200 OK", *headers, b"Content-Length: %d" % len(body)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def head_of(response: bytes) -> bytes:
    """Return the head of a whole *response*, including the blank line."""
    return response.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"


def response_body(received: Received) -> bytes:
    """Return the default handler's response body, which names the request's method and target."""
    return b"response to " + received.method + b" " + received.target


async def respond_with_target(
    received: Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    """Respond to every request with `response_body` and keep the connection open.

    A HEAD response carries the Content-Length of the GET response and no body.
    """
    response = http_response(response_body(received))
    if received.method == b"HEAD":
        response = head_of(response)
    writer.write(response)
    await writer.drain()
    return True


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Read until the peer closes or resets the connection, and return what arrived."""
    data = bytearray()
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), DEADLINE):
            data += chunk
    except ConnectionError:
        pass
    return bytes(data)


async def read_request_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    """Read the body that *head* announces, by Content-Length or chunked framing."""
    lines = head.split(b"\r\n")[1:]
    if [value.lower() for value in header_values(lines, b"transfer-encoding")] == [b"chunked"]:
        return await read_chunked(reader)
    lengths = header_values(lines, b"content-length")
    return await reader.readexactly(int(lengths[0])) if lengths else b""


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    """Read a chunked body, and its trailer section, and return the body decoded."""
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        body += await reader.readexactly(size)
        assert await reader.readexactly(2) == b"\r\n"
    while await reader.readuntil(b"\r\n") != b"\r\n":
        pass
    return bytes(body)


class DevServer:
    """A raw HTTP/1.1 server on a tunnel port that records every request it reads."""

    port: int
    handler: Handler
    requests: list[Received]
    # Connections, by number, that the bastion closed while the dev server waited for the
    # next request, or while a handler waited in `read_until_closed`.
    closed_by_bastion: list[int]
    accepted: int
    _changed: asyncio.Event
    _server: asyncio.Server | None
    _writers: list[asyncio.StreamWriter]

    # False: the handler responds before the body is read, and the body is read and dropped
    # afterwards, as Node.js and aiohttp servers do with a body their handler ignores.
    body_first: bool

    def __init__(self, port: int, handler: Handler, *, body_first: bool = True) -> None:
        self.port = port
        self.handler = handler
        self.body_first = body_first
        self.requests = []
        self.closed_by_bastion = []
        self.accepted = 0
        self._changed = asyncio.Event()
        self._server = None
        self._writers = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def stop(self) -> None:
        """Stop listening and close every connection, which ends the handlers' reads."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in self._writers:
            writer.close()

    async def wait_for_requests(self, count: int) -> None:
        """Wait until *count* requests have arrived."""
        await self._wait(lambda: len(self.requests) >= count)

    async def wait_for_close(self, connection: int) -> None:
        """Wait until the bastion has closed dev server connection number *connection*."""
        await self._wait(lambda: connection in self.closed_by_bastion)

    async def _wait(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(DEADLINE):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    def note_closed(self, connection: int) -> None:
        """Record that the bastion closed connection number *connection*."""
        self.closed_by_bastion.append(connection)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = self.accepted
        self.accepted += 1
        sequence = 0
        self._writers.append(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.note_closed(connection)
                    return
                body = await read_request_body(reader, head) if self.body_first else b""
                received = Received(head, body, connection, sequence)
                self.requests.append(received)
                self._notify()
                if not await self.handler(received, reader, writer):
                    return
                if not self.body_first:
                    await read_request_body(reader, head)
                sequence += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            # The bastion closed the connection during a request body or a response.
            return
        finally:
            self._notify()
            writer.close()


# The caller.


def header_values(lines: list[bytes], name: bytes) -> list[bytes]:
    """Return the values of header *name* (any case) among raw header *lines*, in order."""
    values = []
    for line in lines:
        key, colon, value = line.partition(b":")
        if colon and key.strip().lower() == name.lower():
            values.append(value.strip(b" \t"))
    return values


def http_request(
    method: str = "GET",
    target: str = "/",
    *,
    route: str | None = ROUTE,
    headers: tuple[str, ...] = (),
    body: bytes = b"",
    content_length: int | None = None,
    close: bool = False,
) -> bytes:
    """Return an HTTP/1.1 request. POST, PUT and PATCH always carry Content-Length.

    *content_length* replaces the length of *body*, for a request whose body the test
    sends in parts.
    """
    lines = [f"{method} {target} HTTP/1.1", f"Host: {CALLER_HOST}"]
    if route is not None:
        lines.append(f"X-Ephemwork: {route}")
    lines.extend(headers)
    if content_length is None and (body or method in ("POST", "PUT", "PATCH")):
        content_length = len(body)
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    if close:
        lines.append("Connection: close")
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + body


@attrs.frozen
class Response:
    """A response as the caller read it."""

    status: int
    # The status line and headers, without the blank line.
    head: bytes
    # The body with any chunked framing removed.
    body: bytes
    # The body bytes exactly as they arrived, framing included.
    raw_body: bytes

    @property
    def header_lines(self) -> list[bytes]:
        return self.head.split(b"\r\n")[1:]

    def values(self, name: bytes) -> list[bytes]:
        """Return the values of header *name* (any case), in order."""
        return header_values(self.header_lines, name)

    @property
    def text(self) -> str:
        return self.body.decode()


class Caller:
    """A raw client connection to the bastion's proxy."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def exchange(self, request: bytes, *, method: bytes = b"GET") -> Response:
        """Send *request* and read its response."""
        await self.send(request)
        return await self.response(method=method)

    async def response(self, *, method: bytes = b"GET") -> Response:
        """Read one response. *method* is the request's, because a HEAD response has no body."""
        async with asyncio.timeout(DEADLINE):
            head = (await self.reader.readuntil(b"\r\n\r\n"))[:-4]
            status = int(head.split(b" ", 2)[1])
            lines = head.split(b"\r\n")[1:]
            chunked = header_values(lines, b"transfer-encoding") == [b"chunked"]
            lengths = header_values(lines, b"content-length")
            if method == b"HEAD" or status in (204, 304):
                return Response(status, head, b"", b"")
            if chunked:
                return await self._chunked(status, head)
            if lengths:
                body = await self.reader.readexactly(int(lengths[0]))
                return Response(status, head, body, body)
            body = await self.reader.read()
            return Response(status, head, body, body)

    async def _chunked(self, status: int, head: bytes) -> Response:
        raw = bytearray()
        body = bytearray()
        while True:
            size_line = await self.reader.readuntil(b"\r\n")
            raw += size_line
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            data = await self.reader.readexactly(size + 2)
            raw += data
            body += data[:-2]
        while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
            raw += line
        raw += b"\r\n"
        return Response(status, head, bytes(body), bytes(raw))

    async def read_rest(self) -> bytes:
        """Read until the bastion closes the connection, and return what arrived."""
        return await read_until_closed(self.reader)

    def close(self) -> None:
        self.writer.close()


# The bastion.


class Bastion:
    """A running `BastionServer` with raw dev servers on its tunnel ports."""

    server: BastionServer
    dev_servers: list[DevServer]
    callers: list[Caller]

    def __init__(self, server: BastionServer) -> None:
        self.server = server
        self.dev_servers = []
        self.callers = []

    @property
    def proxy_port(self) -> int:
        return self.server.proxy_address[1]

    def register(self, service: str = "api") -> int:
        """Register alice:*service* and return its tunnel port, where nothing listens yet."""
        assert self.server.registry is not None
        request = RegisterRequest(user="alice", service=service, client="test")
        return self.server.registry.register(request, time.time()).port

    async def dev(
        self,
        handler: Handler = respond_with_target,
        service: str = "api",
        *,
        body_first: bool = True,
    ) -> DevServer:
        """Register alice:*service* and serve *handler* on its tunnel port."""
        dev = DevServer(self.register(service), handler, body_first=body_first)
        await dev.start()
        self.dev_servers.append(dev)
        return dev

    async def caller(self) -> Caller:
        """Open a new connection to the proxy."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.proxy_port)
        caller = Caller(reader, writer)
        self.callers.append(caller)
        return caller

    async def close(self) -> None:
        for caller in self.callers:
            caller.close()
        self.server.close()
        await self.server.wait_closed()
        for dev in self.dev_servers:
            await dev.stop()


BastionFactory = Callable[..., Awaitable[Bastion]]


@pytest.fixture
async def make_bastion(tmp_path: Path) -> AsyncIterator[BastionFactory]:
    """Start bastions on 127.0.0.1 with option overrides, and close each after the test."""
    started: list[Bastion] = []

    async def make(**overrides: object) -> Bastion:
        options = path_options(tmp_path / f"state{len(started)}", **overrides)
        server = BastionServer(options)
        await server.start()
        bastion = Bastion(server)
        started.append(bastion)
        return bastion

    yield make

    for bastion in started:
        await bastion.close()


@pytest.fixture
async def bastion(make_bastion: BastionFactory) -> Bastion:
    """A bastion with default options."""
    return await make_bastion()


# The expected messages are written out rather than imported from error_responses, so that
# a changed message fails these tests.


def closed_message(port: int) -> str:
    return (
        f"the laptop's tunnel for {ROUTE!r} closed the connection without a response "
        f"(bastion port {port}). Check that the dev server on the laptop is running"
    )


def error_text(message: str, response: Response) -> str:
    """Return the plain-text error body with *message* and the response's request id."""
    request_id = response.values(b"x-request-id")[0].decode()
    return f"{message} (request id {request_id})\n"


def not_connected_message(port: int) -> str:
    return (
        f"the laptop's tunnel for {ROUTE!r} is not connected: nothing listens on bastion port "
        f"{port}. Check that `ephemwork up` is still running on the laptop"
    )


def served_by_aiohttp(response: Response) -> bool:
    """Return whether aiohttp wrote *response*, because only aiohttp adds a Server header."""
    servers = response.values(b"server")
    return len(servers) == 1 and b"aiohttp/" in servers[0]


def sends(raw_response: bytes, *, keep_open: bool = True) -> Handler:
    """Return a handler that responds to every request with the bytes *raw_response*."""

    async def handler(
        received: Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(raw_response)
        await writer.drain()
        return keep_open

    return handler


def payload(size: int) -> bytes:
    """Return *size* reproducible pseudo-random bytes."""
    return random.Random(size).randbytes(size)


FIXED_DATE = b"Tue, 01 Jan 2030 00:00:00 GMT"
CHUNKS = (b"first;", b"x" * 70_000, b"last")


class TestForwarding:
    async def test_head_rewritten_response_exact(self, bastion: Bastion) -> None:
        """The dev server gets the rewritten head, and the caller gets the exact response."""
        raw_response = http_response(
            bytes(range(256)) * 4,
            headers=(
                b"Content-Type: application/octet-stream",
                b"Set-Cookie: a=1",
                b"Set-Cookie: b=2",
                b"Date: " + FIXED_DATE,
            ),
        )
        dev = await bastion.dev(sends(raw_response))
        caller = await bastion.caller()

        await caller.send(
            b"GET /orders?id=7&q=%20 HTTP/1.1\r\n"
            b"Host: staging.example.com\r\n"
            b"User-Agent: relay-test\r\n"
            b"X-Ephemwork: alice:api\r\n"
            b"Connection: keep-alive\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"X-Forwarded-For: 203.0.113.9\r\n"
            b"Accept: */*\r\n\r\n"
        )
        raw = await asyncio.wait_for(caller.reader.readexactly(len(raw_response)), DEADLINE)

        assert raw == raw_response
        assert b"\r\nServer:" not in raw
        assert dev.requests[0].head == (
            b"GET /orders?id=7&q=%20 HTTP/1.1\r\n"
            + f"Host: 127.0.0.1:{dev.port}\r\n".encode()
            + b"User-Agent: relay-test\r\n"
            b"X-Ephemwork: alice:api\r\n"
            b"Accept: */*\r\n"
            b"X-Forwarded-For: 203.0.113.9, 127.0.0.1\r\n"
            b"X-Forwarded-Proto: http\r\n"
            b"X-Forwarded-Host: staging.example.com\r\n\r\n"
        )

    async def test_tunnel_connection_reused(self, bastion: Bastion) -> None:
        """Sequential requests, on one caller connection or on new ones, share one tunnel."""
        dev = await bastion.dev()
        caller = await bastion.caller()

        for index in range(3):
            response = await caller.exchange(http_request(target=f"/{index}"))
            assert response.body == f"response to GET /{index}".encode()
        for index in range(3, 5):
            other = await bastion.caller()
            response = await other.exchange(http_request(target=f"/{index}", close=True))
            assert response.body == f"response to GET /{index}".encode()

        assert dev.accepted == 1
        assert [(r.connection, r.sequence) for r in dev.requests] == [(0, i) for i in range(5)]

    async def test_pipelined_in_order(self, bastion: Bastion) -> None:
        """Requests sent in one write get their responses in order, whatever the sizes."""

        async def sized(
            received: Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> bool:
            body = b"b" * 100_000 if received.target == b"/big" else response_body(received)
            writer.write(http_response(body))
            await writer.drain()
            return True

        dev = await bastion.dev(sized)
        caller = await bastion.caller()

        await caller.send(
            http_request(target="/big")
            + http_request("POST", "/post", body=b"posted")
            + http_request(target="/small")
        )
        responses = [await caller.response() for _ in range(3)]

        assert [r.body for r in responses] == [
            b"b" * 100_000,
            b"response to POST /post",
            b"response to GET /small",
        ]
        assert [r.target for r in dev.requests] == [b"/big", b"/post", b"/small"]
        assert dev.requests[1].body == b"posted"
        assert dev.accepted == 1


class TestRetry:
    @staticmethod
    async def close_second_request(
        received: Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Close the first connection right after reading its second request."""
        if (received.connection, received.sequence) == (0, 1):
            return False
        return await respond_with_target(received, reader, writer)

    @pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
    async def test_bodyless_request_retried(self, bastion: Bastion, method: str) -> None:
        """A bodyless GET, PUT or DELETE dropped by a reused connection is sent again."""
        dev = await bastion.dev(self.close_second_request)
        caller = await bastion.caller()

        first = await caller.exchange(http_request(target="/first"))
        second = await caller.exchange(http_request(method, "/second"))

        assert first.body == b"response to GET /first"
        assert second.status == 200
        assert second.body == f"response to {method} /second".encode()
        assert [(r.connection, r.sequence, r.target) for r in dev.requests] == [
            (0, 0, b"/first"),
            (0, 1, b"/second"),
            (1, 0, b"/second"),
        ]
        assert dev.requests[1].head == dev.requests[2].head

    @pytest.mark.parametrize("method", ["POST", "PATCH", "PUT"])
    async def test_request_with_body_not_retried(self, bastion: Bastion, method: str) -> None:
        """A request with a body dropped by a reused connection gets 502, sent only once."""
        dev = await bastion.dev(self.close_second_request)
        caller = await bastion.caller()

        await caller.exchange(http_request(target="/first"))
        second = await caller.exchange(http_request(method, "/second", body=b"abc"))
        third = await caller.exchange(http_request(target="/third"))

        assert second.status == 502
        assert second.text == error_text(closed_message(dev.port), second)
        assert not served_by_aiohttp(second)
        assert [r.target for r in dev.requests] == [b"/first", b"/second", b"/third"]
        assert dev.requests[1].body == b"abc"
        assert third.body == b"response to GET /third"

    async def test_partial_response_not_retried(self, bastion: Bastion) -> None:
        """A GET whose reused connection closed after part of its response is not sent again."""

        async def partial_second(
            received: Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> bool:
            if (received.connection, received.sequence) == (0, 1):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
                await writer.drain()
                return False
            return await respond_with_target(received, reader, writer)

        dev = await bastion.dev(partial_second)
        caller = await bastion.caller()

        await caller.exchange(http_request(target="/first"))
        second = await caller.exchange(http_request(target="/second"))

        assert [r.target for r in dev.requests] == [b"/first", b"/second"]
        assert second.status == 502


class TestHandOver:
    async def plain_first(self, bastion: Bastion) -> Caller:
        """Open a caller connection and have the relay serve a first request on it."""
        caller = await bastion.caller()
        plain = await caller.exchange(http_request(target="/plain"))
        assert plain.body == b"response to GET /plain"
        assert not served_by_aiohttp(plain)
        return caller

    async def test_head(self, bastion: Bastion) -> None:
        """A HEAD after a relayed request is served by aiohttp on the same connection."""
        dev = await bastion.dev()
        caller = await self.plain_first(bastion)

        response = await caller.exchange(http_request("HEAD", "/doc"), method=b"HEAD")

        assert response.status == 200
        assert served_by_aiohttp(response)
        assert response.values(b"content-length") == [b"%d" % len(b"response to HEAD /doc")]
        assert dev.requests[1].method == b"HEAD"

    async def test_chunked_request_body(self, bastion: Bastion) -> None:
        """A chunked request body after a relayed request reaches the dev server whole."""
        dev = await bastion.dev()
        caller = await self.plain_first(bastion)

        response = await caller.exchange(
            b"POST /upload HTTP/1.1\r\nHost: staging.example.com\r\nX-Ephemwork: alice:api\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n"
        )

        assert response.body == b"response to POST /upload"
        assert served_by_aiohttp(response)
        assert dev.requests[1].body == b"hello, world"

    async def test_cookie_route(self, bastion: Bastion) -> None:
        """A request routed by cookie after a relayed request reaches the dev server."""
        dev = await bastion.dev()
        caller = await self.plain_first(bastion)

        response = await caller.exchange(
            http_request(target="/by-cookie", route=None, headers=("Cookie: ephemwork=alice:api",))
        )

        assert response.body == b"response to GET /by-cookie"
        assert served_by_aiohttp(response)
        assert dev.requests[1].values(b"x-ephemwork") == [b"alice:api"]

    async def test_unknown_route(self, bastion: Bastion) -> None:
        """An unregistered route after a relayed request gets the proxy's 404."""
        dev = await bastion.dev()
        caller = await self.plain_first(bastion)

        response = await caller.exchange(http_request(target="/nobody", route="bob:api"))

        assert response.status == 404
        assert served_by_aiohttp(response)
        assert response.text == error_text("no laptop is registered for 'bob:api'", response)
        assert len(dev.requests) == 1

    async def test_pipelined(self, bastion: Bastion) -> None:
        """A non-plain request read together with a plain one is handed over after it."""
        dev = await bastion.dev()
        caller = await bastion.caller()

        await caller.send(http_request(target="/plain") + http_request("HEAD", "/doc"))
        plain = await caller.response()
        head = await caller.response(method=b"HEAD")

        assert plain.body == b"response to GET /plain"
        assert not served_by_aiohttp(plain)
        assert head.status == 200
        assert served_by_aiohttp(head)
        assert [r.method for r in dev.requests] == [b"GET", b"HEAD"]

    @pytest.mark.parametrize(
        ("target", "status", "body"),
        [
            pytest.param("/ephemwork%2Dhealth", 200, b"ok", id="encoded-health-path"),
            pytest.param("/?ephemwork", 307, b"", id="route-parameter-without-value"),
            pytest.param("/?%65phemwork=alice:api", 307, b"", id="encoded-route-parameter"),
        ],
    )
    async def test_bastion_paths_like_aiohttp(
        self, bastion: Bastion, target: str, status: int, body: bytes
    ) -> None:
        """A target that aiohttp's proxy handles itself is not relayed to the dev server."""
        dev = await bastion.dev()
        caller = await bastion.caller()

        response = await caller.exchange(http_request(target=target))

        assert response.status == status
        assert response.body == body
        assert dev.requests == []

    @pytest.mark.parametrize(
        ("data", "status"),
        [
            pytest.param(
                b"GET /lf HTTP/1.1\nHost: x\nX-Ephemwork: alice:api\n\n", 400, id="bare-lf"
            ),
            pytest.param(
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)),
                405,
                id="tls-client-hello",
            ),
            pytest.param(
                b"GET / HTTP/1.1\r\nHost: x\r\nBad header line\r\n", 400, id="bad-header-line"
            ),
        ],
    )
    async def test_unparseable_head_rejected(
        self, make_bastion: BastionFactory, data: bytes, status: int
    ) -> None:
        """A head that aiohttp rejects from its first lines gets aiohttp's error, not 408."""
        bastion = await make_bastion(connection_limits=ConnectionLimits(header_timeout=0.5))
        caller = await bastion.caller()

        response = await caller.exchange(data)

        assert response.status == status
        assert served_by_aiohttp(response)


class TestBodies:
    async def test_upload_content_length(self, bastion: Bastion) -> None:
        """A 5 MiB request body with Content-Length reaches the dev server intact."""

        async def digest(
            received: Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> bool:
            writer.write(http_response(hashlib.sha256(received.body).hexdigest().encode()))
            await writer.drain()
            return True

        dev = await bastion.dev(digest)
        caller = await bastion.caller()
        upload = payload(5 * MIB)

        response = await caller.exchange(http_request("POST", "/upload", body=upload))

        assert response.status == 200
        assert response.text == hashlib.sha256(upload).hexdigest()
        assert len(dev.requests[0].body) == 5 * MIB

    async def test_download_content_length(self, bastion: Bastion) -> None:
        """A 5 MiB response body with Content-Length reaches the caller intact."""
        download = payload(5 * MIB)
        await bastion.dev(sends(http_response(download)))
        caller = await bastion.caller()

        response = await caller.exchange(http_request(target="/download"))

        assert response.values(b"content-length") == [b"%d" % (5 * MIB)]
        assert response.values(b"transfer-encoding") == []
        assert hashlib.sha256(response.body).hexdigest() == hashlib.sha256(download).hexdigest()

    async def test_chunked_response_reframed(self, bastion: Bastion) -> None:
        """A chunked response arrives chunked and whole, without its trailer."""
        chunked = b"".join(b"%x\r\n%b\r\n" % (len(chunk), chunk) for chunk in CHUNKS)
        raw_response = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n"
            b"Trailer: X-Checksum\r\n\r\n" + chunked + b"0\r\nX-Checksum: abc\r\n\r\n"
        )
        await bastion.dev(sends(raw_response))
        caller = await bastion.caller()

        response = await caller.exchange(http_request(target="/chunked"))
        after = await caller.exchange(http_request(target="/after"))

        assert response.values(b"transfer-encoding") == [b"chunked"]
        assert response.values(b"content-length") == []
        assert response.values(b"trailer") == []
        assert response.body == b"".join(CHUNKS)
        assert b"X-Checksum" not in response.raw_body
        assert after.status == 200

    async def test_response_until_close(self, bastion: Bastion) -> None:
        """A response that ends with the tunnel's close arrives whole, and the caller goes on."""
        body = payload(100_000)

        async def until_close(
            received: Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> bool:
            if received.connection > 0:
                return await respond_with_target(received, reader, writer)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body)
            await writer.drain()
            return False

        dev = await bastion.dev(until_close)
        caller = await bastion.caller()

        response = await caller.exchange(http_request(target="/stream"))
        after = await caller.exchange(http_request(target="/after"))

        assert response.values(b"transfer-encoding") == [b"chunked"]
        assert response.body == body
        assert after.body == b"response to GET /after"
        assert dev.accepted == 2

    async def test_early_response_tunnel_not_reused(self, make_bastion: BastionFactory) -> None:
        """After a response sent before the whole request body, the next request is not lost."""
        bastion = await make_bastion(proxy_timeouts=ProxyTimeouts(read=0.5))
        dev = await bastion.dev(body_first=False)
        caller = await bastion.caller()

        await caller.send(http_request("POST", "/upload", content_length=100_000) + b"x" * 1000)
        early = await caller.response()
        other = await bastion.caller()
        after = await other.exchange(http_request(target="/after"))

        assert early.body == b"response to POST /upload"
        assert after.status == 200
        assert after.body == b"response to GET /after"
        assert [r.target for r in dev.requests] == [b"/upload", b"/after"]


class TestResponseHead:
    async def test_interim_response_dropped(self, bastion: Bastion) -> None:
        """A 103 Early Hints before the final response is not passed on."""
        await bastion.dev(
            sends(
                b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                + http_response(b"final")
            )
        )
        caller = await bastion.caller()

        response = await caller.exchange(http_request(target="/page"))
        after = await caller.exchange(http_request(target="/page"))

        assert response.head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert response.values(b"link") == []
        assert response.body == b"final"
        assert after.body == b"final"

    @pytest.mark.parametrize(
        ("raw_response", "lengths"),
        [
            pytest.param(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", [], id="204"),
            pytest.param(
                b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 12\r\n\r\n',
                [b"12"],
                id="304",
            ),
        ],
    )
    async def test_no_body_statuses(
        self, bastion: Bastion, raw_response: bytes, lengths: list[bytes]
    ) -> None:
        """204 and 304 arrive with no body and no chunked framing, and the next response follows.

        A 304 keeps the Content-Length of the representation it stands for, and a 204 may
        carry none (RFC 9110 section 8.6).
        """

        async def no_body_first(
            received: Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> bool:
            if received.sequence > 0:
                return await respond_with_target(received, reader, writer)
            writer.write(raw_response)
            await writer.drain()
            return True

        await bastion.dev(no_body_first)
        caller = await bastion.caller()

        await caller.send(http_request(target="/empty") + http_request(target="/after"))
        response = await caller.response()
        after_head = await asyncio.wait_for(caller.reader.readuntil(b"\r\n"), DEADLINE)

        assert response.head.split(b"\r\n")[0] == raw_response.split(b"\r\n")[0]
        assert response.values(b"transfer-encoding") == []
        assert response.values(b"content-length") == lengths
        assert after_head == b"HTTP/1.1 200 OK\r\n"

    async def test_date_added(self, bastion: Bastion) -> None:
        """A response without Date gets one, in the HTTP date format."""
        await bastion.dev()
        caller = await bastion.caller()

        response = await caller.exchange(http_request(target="/"))

        dates = response.values(b"date")
        assert len(dates) == 1
        assert dates[0].endswith(b" GMT")
        assert email.utils.parsedate_to_datetime(dates[0].decode()).tzinfo is not None

    async def test_date_kept(self, bastion: Bastion) -> None:
        """A response with Date keeps the dev server's value and gets no second one."""
        await bastion.dev(sends(http_response(b"dated", headers=(b"Date: " + FIXED_DATE,))))
        caller = await bastion.caller()

        response = await caller.exchange(http_request(target="/"))

        assert response.values(b"date") == [FIXED_DATE]

    async def test_caller_connection_close(self, bastion: Bastion) -> None:
        """A caller's Connection: close comes back on the response and closes that connection."""
        dev = await bastion.dev()
        caller = await bastion.caller()

        response = await caller.exchange(http_request(target="/bye", close=True))
        rest = await caller.read_rest()
        other = await bastion.caller()
        after = await other.exchange(http_request(target="/after"))

        assert response.values(b"connection") == [b"close"]
        assert response.body == b"response to GET /bye"
        assert rest == b""
        assert dev.requests[0].values(b"connection") == []
        assert after.body == b"response to GET /after"
        assert dev.accepted == 1


class TestErrors:
    async def test_nothing_listening(self, bastion: Bastion) -> None:
        """A tunnel port where nothing listens gets 502 naming the route and port."""
        port = bastion.register()
        caller = await bastion.caller()

        response = await caller.exchange(http_request(target="/"))

        assert response.status == 502
        assert not served_by_aiohttp(response)
        assert response.text == error_text(not_connected_message(port), response)

    async def test_closed_without_response(self, bastion: Bastion) -> None:
        """A fresh tunnel connection closed without a response gets 502, and no retry."""
        dev = await bastion.dev(sends(b"", keep_open=False))
        caller = await bastion.caller()

        response = await caller.exchange(http_request(target="/"))

        assert response.status == 502
        assert not served_by_aiohttp(response)
        assert response.text == error_text(closed_message(dev.port), response)
        assert dev.accepted == 1
        assert len(dev.requests) == 1

    @pytest.mark.parametrize(
        "raw_response",
        [
            pytest.param(b"HTTP/1.1 abc OK\r\nContent-Length: 2\r\n\r\nok", id="status-line"),
            pytest.param(
                b"HTTP/1.1 200 OK\r\nX-Bad: a\x01b\r\nContent-Length: 2\r\n\r\nok",
                id="control-byte",
            ),
        ],
    )
    async def test_malformed_response(self, bastion: Bastion, raw_response: bytes) -> None:
        """A malformed status line or header gets 502 naming the route, and none of it passes."""
        await bastion.dev(sends(raw_response))
        caller = await bastion.caller()

        response = await caller.exchange(http_request(target="/"))

        assert response.status == 502
        assert not served_by_aiohttp(response)
        assert response.text.startswith(f"the laptop's tunnel for {ROUTE!r} ")
        assert response.text.endswith(
            error_text(". Check the dev server's response headers", response)
        )
        assert b"X-Bad" not in response.head

    @pytest.mark.parametrize(
        ("raw_response", "problem"),
        [
            pytest.param(
                b"HTTP/1.1 abc OK\r\nContent-Length: 2\r\n\r\nok",
                "sent a malformed response (",
                id="status-line",
            ),
            pytest.param(
                b"HTTP/1.1 200 OK\r\nX-Bad: a\x01b\r\nContent-Length: 2\r\n\r\nok",
                "sent a malformed response (Invalid header value char).",
                id="control-byte",
            ),
            pytest.param(
                b"HTTP/1.1 200 OK\r\nX-Bad: caf\xe9\r\nContent-Length: 2\r\n\r\nok",
                "sent a response header 'X-Bad' with the byte 0xe9, which is not UTF-8",
                id="latin-1-byte",
            ),
        ],
    )
    async def test_malformed_response_message(
        self, bastion: Bastion, raw_response: bytes, problem: str
    ) -> None:
        """The 502 for a malformed response names the problem."""
        await bastion.dev(sends(raw_response))
        caller = await bastion.caller()

        response = await caller.exchange(http_request(target="/"))

        assert response.text.startswith(f"the laptop's tunnel for {ROUTE!r} {problem}")

    async def test_read_timeout(self, make_bastion: BastionFactory) -> None:
        """No response within the read timeout gets 504, and that tunnel connection is closed."""
        bastion = await make_bastion(proxy_timeouts=ProxyTimeouts(read=0.3))

        async def silent_first(
            received: Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> bool:
            if received.connection > 0:
                return await respond_with_target(received, reader, writer)
            await read_until_closed(reader)
            dev.note_closed(received.connection)
            return False

        dev = await bastion.dev(silent_first)
        caller = await bastion.caller()

        response = await caller.exchange(http_request(target="/slow"))
        await dev.wait_for_close(0)
        after = await caller.exchange(http_request(target="/after"))

        assert response.status == 504
        assert not served_by_aiohttp(response)
        assert response.text == error_text(
            f"the laptop's tunnel for {ROUTE!r} timed out (connect timeout 5.0 s, "
            "read timeout 0.3 s)",
            response,
        )
        assert after.body == b"response to GET /after"
        assert dev.accepted == 2

    async def test_failure_mid_body(self, bastion: Bastion) -> None:
        """A tunnel that closes mid-body cuts the caller's connection before the body's end."""
        body = payload(200_000)
        sent = body[:80_000]
        await bastion.dev(sends(head_of(http_response(body)) + sent, keep_open=False))
        caller = await bastion.caller()

        await caller.send(http_request(target="/big"))
        head = await asyncio.wait_for(caller.reader.readuntil(b"\r\n\r\n"), DEADLINE)
        received = await caller.read_rest()

        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Content-Length: 200000\r\n" in head
        assert len(received) < len(body)
        assert sent.startswith(received)


class TestCallerGone:
    async def test_disconnect_mid_response(self, bastion: Bastion) -> None:
        """A caller gone mid-response closes that tunnel connection, which is not reused."""

        async def stream_first(
            received: Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> bool:
            if received.connection > 0:
                return await respond_with_target(received, reader, writer)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (4 * MIB))
            writer.write(payload(256 * 1024))
            await read_until_closed(reader)
            dev.note_closed(received.connection)
            return False

        dev = await bastion.dev(stream_first)
        first = await bastion.caller()

        await first.send(http_request(target="/big"))
        await asyncio.wait_for(first.reader.readuntil(b"\r\n\r\n"), DEADLINE)
        first.close()
        await dev.wait_for_close(0)
        second = await bastion.caller()
        after = await second.exchange(http_request(target="/after"))

        assert after.body == b"response to GET /after"
        assert dev.accepted == 2
        assert (dev.requests[1].connection, dev.requests[1].target) == (1, b"/after")


class TestShutdown:
    @staticmethod
    def held_until(release: asyncio.Event) -> Handler:
        """Return a handler that responds to /held only once *release* is set."""

        async def handler(
            received: Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> bool:
            if received.target == b"/held":
                await asyncio.wait_for(release.wait(), DEADLINE)
            return await respond_with_target(received, reader, writer)

        return handler

    @pytest.mark.parametrize("idle_method", ["GET", "HEAD"], ids=["relayed", "aiohttp"])
    async def test_idle_closed_busy_completed(
        self, bastion: Bastion, monkeypatch: pytest.MonkeyPatch, idle_method: str
    ) -> None:
        """Shutdown closes an idle connection at once and completes the request in progress.

        The idle connection served a GET through the relay, or a HEAD through aiohttp.
        """
        # A 2 s grace keeps the failing case short. The busy response needs milliseconds.
        monkeypatch.setattr("ephemwork.bastion.server.SHUTDOWN_TIMEOUT", 2.0)
        release = asyncio.Event()
        dev = await bastion.dev(self.held_until(release))
        idle = await bastion.caller()
        await idle.exchange(http_request(idle_method, "/idle"), method=idle_method.encode())
        busy = await bastion.caller()
        await busy.send(http_request(target="/held"))
        await dev.wait_for_requests(2)

        bastion.server.close()
        closing = asyncio.create_task(bastion.server.wait_closed())
        try:
            idle_rest = await idle.read_rest()
            closed_before_response = closing.done()
            release.set()
            busy_raw = await busy.read_rest()
        finally:
            await asyncio.wait_for(closing, DEADLINE)

        assert idle_rest == b""
        assert not closed_before_response
        assert busy_raw.startswith(b"HTTP/1.1 200 OK\r\n")
        assert busy_raw.endswith(b"\r\n\r\nresponse to GET /held")
