"""Tests for recognising plain requests and rewriting their heads, without sockets."""

from __future__ import annotations

import pytest

from ephemwork.bastion.plain_request import (
    MAX_PLAIN_HEAD,
    PlainRequest,
    may_be_plain,
    read_plain_request,
)
from ephemwork.wire import RouteKey

HOST = b"Host: staging.example.com"
ROUTE = b"X-Ephemwork: alice:api"
# Bytes after the head, such as a body or the next request, which the parser must not read.
AFTER_HEAD = b"POST /next HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"


def parse(request_line: bytes, *headers: bytes) -> PlainRequest | None:
    """Run read_plain_request on a head made of *request_line* and *headers*."""
    head = b"\r\n".join((request_line, *headers))
    return read_plain_request(head + b"\r\n\r\n" + AFTER_HEAD, len(head))


def parse_plain(request_line: bytes, *headers: bytes) -> PlainRequest:
    """Parse a head that must be plain."""
    request = parse(request_line, *headers)
    assert request is not None
    return request


class TestPlain:
    @pytest.mark.parametrize("method", [b"GET", b"POST", b"PUT", b"DELETE", b"PATCH"])
    def test_methods(self, method: bytes) -> None:
        """Each of the five common methods is plain."""
        request = parse_plain(method + b" /orders HTTP/1.1", HOST, ROUTE)
        assert request.method == method.decode()

    @pytest.mark.parametrize(
        ("request_line", "headers"),
        [
            pytest.param(b"GET /a%2Fb/c?x=1&y=%20 HTTP/1.1", (HOST, ROUTE), id="encoded-target"),
            pytest.param(
                b"GET / HTTP/1.1", (b"host: x", b"x-ephemwork: alice:api"), id="lowercase"
            ),
            pytest.param(
                b"GET / HTTP/1.1", (HOST, b"X-Ephemwork: \t alice:api \t"), id="route-with-ows"
            ),
            pytest.param(b"GET / HTTP/1.1", (HOST, ROUTE, b"X-Note: a\tb"), id="tab-in-value"),
            pytest.param(b"GET / HTTP/1.1", (HOST, ROUTE, b"X-Empty:"), id="empty-value"),
            pytest.param(
                b"GET / HTTP/1.1", (HOST, ROUTE, b"Connection: Keep-Alive"), id="connection"
            ),
            pytest.param(
                b"GET / HTTP/1.1",
                (HOST, ROUTE, b"Cookie: ephemwork=bob:web", b"baggage: ephemwork=bob:web"),
                id="header-beats-cookie-and-baggage",
            ),
            pytest.param(b"POST / HTTP/1.1", (HOST, ROUTE, b"Content-Length: 0"), id="zero-length"),
        ],
    )
    def test_plain(self, request_line: bytes, headers: tuple[bytes, ...]) -> None:
        """Heads within the plain subset are recognised."""
        assert parse(request_line, *headers) is not None

    def test_fields(self) -> None:
        """The parsed fields contain the request line, route, Host, Accept and the head's size."""
        head = b"\r\n".join(
            (b"PATCH /orders/7?full=1 HTTP/1.1", HOST, ROUTE, b"Accept: application/json")
        )

        request = read_plain_request(head + b"\r\n\r\n" + AFTER_HEAD, len(head))

        assert request is not None
        assert request.method == "PATCH"
        assert request.target == "/orders/7?full=1"
        assert request.route == RouteKey("alice", "api")
        assert request.host == "staging.example.com"
        assert request.accept == "application/json"
        assert request.head_size == len(head) + 4

    def test_largest_head(self) -> None:
        """A head of exactly MAX_PLAIN_HEAD bytes is still plain."""
        prefix = b"\r\n".join((b"GET / HTTP/1.1", HOST, ROUTE, b"X-Pad: "))
        padding = b"p" * (MAX_PLAIN_HEAD - len(prefix))
        assert parse(b"GET / HTTP/1.1", HOST, ROUTE, b"X-Pad: " + padding) is not None


class TestHandedOver:
    @pytest.mark.parametrize(
        "request_line",
        [
            pytest.param(b"GET / HTTP/1.0", id="http-1.0"),
            pytest.param(b"GET / HTTP/2.0", id="http-2.0"),
            pytest.param(b"GET / http/1.1", id="lowercase-version"),
            pytest.param(b"GET  / HTTP/1.1", id="two-spaces"),
            pytest.param(b"GET /", id="no-version"),
        ],
    )
    def test_request_line(self, request_line: bytes) -> None:
        """Anything but ``METHOD SP target SP HTTP/1.1`` goes to aiohttp."""
        assert parse(request_line, HOST, ROUTE) is None

    @pytest.mark.parametrize(
        "method", [b"HEAD", b"OPTIONS", b"CONNECT", b"TRACE", b"PROPFIND", b"QUERY", b"get"]
    )
    def test_method(self, method: bytes) -> None:
        """Methods other than the five common ones, in upper case, go to aiohttp."""
        assert parse(method + b" / HTTP/1.1", HOST, ROUTE) is None

    @pytest.mark.parametrize(
        "target",
        [
            pytest.param(b"http://staging.example.com/", id="absolute-form"),
            pytest.param(b"*", id="asterisk-form"),
            pytest.param(b"staging.example.com:443", id="authority-form"),
            pytest.param(b"/caf\xc3\xa9", id="non-ascii"),
            pytest.param(b"/a\x7fb", id="del"),
        ],
    )
    def test_target(self, target: bytes) -> None:
        """A target other than origin form of visible ASCII goes to aiohttp."""
        assert parse(b"GET " + target + b" HTTP/1.1", HOST, ROUTE) is None

    @pytest.mark.parametrize(
        "routes",
        [
            pytest.param((), id="missing"),
            pytest.param((ROUTE, ROUTE), id="repeated"),
            pytest.param((b"X-Ephemwork: alice",), id="no-colon"),
            pytest.param((b"X-Ephemwork: alice:api, alice:api",), id="list"),
            pytest.param((b"X-Ephemwork:",), id="empty"),
            pytest.param((b"X-Ephemwork: al ice:api",), id="invalid-name"),
        ],
    )
    def test_route_header(self, routes: tuple[bytes, ...]) -> None:
        """Anything but exactly one X-Ephemwork header with a valid route goes to aiohttp."""
        assert parse(b"GET / HTTP/1.1", HOST, *routes) is None

    @pytest.mark.parametrize(
        "hosts",
        [pytest.param((), id="missing"), pytest.param((HOST, b"Host: other"), id="repeated")],
    )
    def test_host(self, hosts: tuple[bytes, ...]) -> None:
        """A head without exactly one Host goes to aiohttp."""
        assert parse(b"GET / HTTP/1.1", ROUTE, *hosts) is None

    @pytest.mark.parametrize(
        "header",
        [
            b"Transfer-Encoding: chunked",
            b"transfer-encoding: chunked",
            b"Expect: 100-continue",
            b"Upgrade: websocket",
            b"Origin: https://app.example.com",
            b"TE: trailers",
            b"Trailer: X-Checksum",
        ],
    )
    def test_header_needing_aiohttp(self, header: bytes) -> None:
        """Framing, interim-response, upgrade and CORS headers send the request to aiohttp."""
        assert parse(b"POST / HTTP/1.1", HOST, ROUTE, header) is None

    @pytest.mark.parametrize(
        "value", [b"upgrade", b"keep-alive, te", b"X-Custom", b"", b"close, keep-alive, upgrade"]
    )
    def test_connection_token(self, value: bytes) -> None:
        """A Connection header with a token other than keep-alive or close goes to aiohttp."""
        assert parse(b"GET / HTTP/1.1", HOST, ROUTE, b"Connection: " + value) is None

    @pytest.mark.parametrize(
        "target",
        [
            pytest.param(b"/ephemwork-health", id="health"),
            pytest.param(b"/ephemwork-health?from=alb", id="health-query"),
            pytest.param(b"/ephemwork%2Dhealth", id="encoded-health-path"),
            pytest.param(b"/?ephemwork=alice:api", id="set-route"),
            pytest.param(b"/page?x=1&ephemwork=", id="clear-route"),
            pytest.param(b"/?ephemwork", id="route-parameter-without-value"),
            pytest.param(b"/?%65phemwork=alice:api", id="encoded-route-parameter"),
            pytest.param(b"/search?q=ephemwork", id="query-mentions-ephemwork"),
        ],
    )
    def test_bastion_target(self, target: bytes) -> None:
        """A target with ``ephemwork`` in it, before or after decoding, goes to aiohttp.

        aiohttp's proxy handles the health check and the cookie parameter itself.
        """
        assert parse(b"GET " + target + b" HTTP/1.1", HOST, ROUTE) is None

    @pytest.mark.parametrize(
        "lengths",
        [
            pytest.param((b"Content-Length: 3", b"Content-Length: 3"), id="repeated"),
            pytest.param((b"Content-Length: -1",), id="negative"),
            pytest.param((b"Content-Length: 1e3",), id="exponent"),
            pytest.param((b"Content-Length: 0x10",), id="hex"),
            pytest.param((b"Content-Length: 3, 3",), id="list"),
            pytest.param((b"Content-Length:",), id="empty"),
        ],
    )
    def test_content_length(self, lengths: tuple[bytes, ...]) -> None:
        """Anything but one Content-Length of decimal digits goes to aiohttp."""
        assert parse(b"POST / HTTP/1.1", HOST, ROUTE, *lengths) is None

    @pytest.mark.parametrize(
        "line",
        [
            pytest.param(b" folded continuation", id="obs-fold"),
            pytest.param(b"NoColon", id="no-colon"),
            pytest.param(b"X Bad: value", id="space-in-name"),
            pytest.param(b"X-Bad : value", id="space-before-colon"),
            pytest.param(b": value", id="empty-name"),
            pytest.param(b"X-Bad: a\x01b", id="control-byte"),
            pytest.param(b"X-Bad: a\x7fb", id="del"),
            pytest.param(b"X-Bad: caf\xe9", id="obs-text"),
            pytest.param(b"X-Bad: a\rb", id="bare-cr"),
        ],
    )
    def test_header_line(self, line: bytes) -> None:
        """A header line outside visible ASCII name-colon-value goes to aiohttp."""
        assert parse(b"GET / HTTP/1.1", HOST, ROUTE, line) is None

    def test_head_too_large(self) -> None:
        """A head above MAX_PLAIN_HEAD goes to aiohttp, which applies its own size limit."""
        prefix = b"\r\n".join((b"GET / HTTP/1.1", HOST, ROUTE, b"X-Pad: "))
        padding = b"p" * (MAX_PLAIN_HEAD - len(prefix) + 1)
        assert parse(b"GET / HTTP/1.1", HOST, ROUTE, b"X-Pad: " + padding) is None


class TestIncompleteHead:
    @pytest.mark.parametrize(
        "start",
        [
            pytest.param(b"", id="empty"),
            pytest.param(b"G", id="method-prefix"),
            pytest.param(b"PATCH ", id="method"),
            pytest.param(b"GET /a?b=c HTT", id="partial-request-line"),
            pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX-Eph", id="partial-header"),
            pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\n", id="whole-lines"),
        ],
    )
    def test_may_be_plain(self, start: bytes) -> None:
        """A start that a plain head could continue keeps waiting for the head's end."""
        assert may_be_plain(start)

    @pytest.mark.parametrize(
        "start",
        [
            pytest.param(b"\x16\x03\x01\x02\x00", id="tls-client-hello"),
            pytest.param(b"HEAD ", id="other-method"),
            pytest.param(b"GET / HTTP/1.1\nHost: x", id="bare-lf"),
            pytest.param(b"GET / HTTP/1.0\r\n", id="http-1.0"),
            pytest.param(b"GET /\r\n", id="short-request-line"),
            pytest.param(b"GET / HTTP/1.1\r\nBad header line\r\n", id="line-without-colon"),
            pytest.param(b"GET / HTTP/1.1\r\n Host: x\r\n", id="obs-fold"),
        ],
    )
    def test_cannot_be_plain(self, start: bytes) -> None:
        """A start that no plain head has goes to aiohttp before the head ends."""
        assert not may_be_plain(start)


class TestFraming:
    @pytest.mark.parametrize(
        ("headers", "expected"),
        [
            pytest.param((), 0, id="absent"),
            pytest.param((b"Content-Length: 0",), 0, id="zero"),
            pytest.param((b"Content-Length: 5242880",), 5242880, id="large"),
            pytest.param((b"content-length:  42 ",), 42, id="ows"),
        ],
    )
    def test_content_length(self, headers: tuple[bytes, ...], expected: int) -> None:
        """content_length is the Content-Length value, or 0 without one."""
        assert parse_plain(b"POST / HTTP/1.1", HOST, ROUTE, *headers).content_length == expected

    @pytest.mark.parametrize(
        ("headers", "expected"),
        [
            pytest.param((), True, id="default"),
            pytest.param((b"Connection: keep-alive",), True, id="keep-alive"),
            pytest.param((b"Connection: close",), False, id="close"),
            pytest.param((b"Connection: Close",), False, id="close-mixed-case"),
            pytest.param((b"Connection: keep-alive, close",), False, id="both"),
            pytest.param(
                (b"Connection: keep-alive", b"Connection: close"), False, id="close-second"
            ),
        ],
    )
    def test_keep_alive(self, headers: tuple[bytes, ...], expected: bool) -> None:
        """keep_alive is False exactly when a Connection header lists close."""
        assert parse_plain(b"GET / HTTP/1.1", HOST, ROUTE, *headers).keep_alive is expected


class TestHeadForTunnel:
    def test_whole_head(self) -> None:
        """The head names the tunnel port, keeps the caller's order and adds forwarding headers."""
        request = parse_plain(
            b"POST /orders?id=7 HTTP/1.1",
            b"User-Agent: curl/8.5.0",
            HOST,
            ROUTE,
            b"Connection: keep-alive",
            b"Keep-Alive: timeout=5",
            b"Proxy-Connection: keep-alive",
            b"Content-Type: application/json",
            b"X-Forwarded-For: 203.0.113.9",
            b"Content-Length: 2",
            b"Accept: */*",
        )

        head = request.head_for_tunnel(20007, "192.0.2.50")

        assert head == (
            b"POST /orders?id=7 HTTP/1.1\r\n"
            b"Host: 127.0.0.1:20007\r\n"
            b"User-Agent: curl/8.5.0\r\n"
            b"X-Ephemwork: alice:api\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: 2\r\n"
            b"Accept: */*\r\n"
            b"X-Forwarded-For: 203.0.113.9, 192.0.2.50\r\n"
            b"X-Forwarded-Proto: http\r\n"
            b"X-Forwarded-Host: staging.example.com\r\n"
            b"\r\n"
        )

    def test_forwarded_for_chain(self) -> None:
        """The peer is appended to every X-Forwarded-For entry the caller sent, in order."""
        request = parse_plain(
            b"GET / HTTP/1.1",
            HOST,
            ROUTE,
            b"X-Forwarded-For: 203.0.113.1",
            b"X-Forwarded-For:",
            b"x-forwarded-for: 198.51.100.2, 10.0.0.1",
        )

        head = request.head_for_tunnel(20000, "192.0.2.50")

        assert _values(head, b"x-forwarded-for") == [
            b"203.0.113.1, 198.51.100.2, 10.0.0.1, 192.0.2.50"
        ]

    def test_forwarded_for_without_peer(self) -> None:
        """Without a peer address the caller's chain is passed on as it was."""
        request = parse_plain(b"GET / HTTP/1.1", HOST, ROUTE, b"X-Forwarded-For: 203.0.113.1")
        assert _values(request.head_for_tunnel(20000, ""), b"x-forwarded-for") == [b"203.0.113.1"]

    def test_no_forwarded_for(self) -> None:
        """Without a peer address or a caller chain no X-Forwarded-For is sent."""
        request = parse_plain(b"GET / HTTP/1.1", HOST, ROUTE)
        assert _values(request.head_for_tunnel(20000, ""), b"x-forwarded-for") == []

    def test_forwarded_proto_kept(self) -> None:
        """A caller's X-Forwarded-Proto stays in its place and none is added."""
        request = parse_plain(
            b"GET / HTTP/1.1", HOST, b"x-forwarded-proto: https", ROUTE, b"Accept: */*"
        )

        lines = request.head_for_tunnel(20000, "192.0.2.50").split(b"\r\n")

        assert lines[1:5] == [
            b"Host: 127.0.0.1:20000",
            b"x-forwarded-proto: https",
            b"X-Ephemwork: alice:api",
            b"Accept: */*",
        ]
        assert _values(b"\r\n".join(lines), b"x-forwarded-proto") == [b"https"]

    def test_forwarded_proto_added(self) -> None:
        """Without a caller's X-Forwarded-Proto, http is sent."""
        request = parse_plain(b"GET / HTTP/1.1", HOST, ROUTE)
        assert _values(request.head_for_tunnel(20000, "192.0.2.50"), b"x-forwarded-proto") == [
            b"http"
        ]

    def test_forwarded_host(self) -> None:
        """X-Forwarded-Host carries the caller's Host, and Host names the tunnel port."""
        request = parse_plain(b"GET / HTTP/1.1", b"Host: api.staging.example.com:8443", ROUTE)

        head = request.head_for_tunnel(20999, "192.0.2.50")

        assert _values(head, b"x-forwarded-host") == [b"api.staging.example.com:8443"]
        assert _values(head, b"host") == [b"127.0.0.1:20999"]

    def test_hop_by_hop_dropped(self) -> None:
        """Connection, Keep-Alive and Proxy-Connection are not passed on."""
        request = parse_plain(
            b"GET / HTTP/1.1",
            HOST,
            ROUTE,
            b"Connection: close",
            b"keep-alive: timeout=5",
            b"Proxy-Connection: keep-alive",
        )

        head = request.head_for_tunnel(20000, "192.0.2.50")

        assert _values(head, b"connection") == []
        assert _values(head, b"keep-alive") == []
        assert _values(head, b"proxy-connection") == []


def _values(head: bytes, name: bytes) -> list[bytes]:
    """Return the values of header *name* (lower case) in a request head, in order."""
    values = []
    for line in head.split(b"\r\n")[1:]:
        key, colon, value = line.partition(b":")
        if colon and key.lower() == name:
            values.append(value.strip())
    return values
