"""Recognising the requests that the relay forwards without aiohttp, with no I/O.

Most requests through the bastion are plain: HTTP/1.1, a common method, an
``X-Ephemwork`` header, and either no body or one sized by Content-Length.
`read_plain_request` parses such a request head and returns a `PlainRequest`. For anything
else (other routing, a chunked body, an upgrade, an Expect, a CORS request, a malformed
line, a target that names ``ephemwork``) it returns None. The connection is then handed to
the aiohttp proxy, which makes every decision and sends every error response. The parser
accepts a narrow subset on purpose, so a request is either forwarded exactly as this module
understood it or never seen by this module again.
"""

from __future__ import annotations

import re
import urllib.parse

import attrs

from ephemwork.bastion.routing import InvalidRouteError, parse_route_value
from ephemwork.wire import RouteKey

# GET, POST, PUT, DELETE and PATCH. HEAD is left to aiohttp, because httptools has no way to
# skip the body that a HEAD response's Content-Length announces. OPTIONS may be a preflight.
PLAIN_METHODS = frozenset({b"GET", b"POST", b"PUT", b"DELETE", b"PATCH"})

# aiohttp rejects request lines and header fields above 8190 bytes, so a larger head goes
# to aiohttp for its own error response.
MAX_PLAIN_HEAD = 16 * 1024

# A request target in origin form of visible ASCII, as RFC 9112 section 3.2.1 allows.
_TARGET = re.compile(rb"/[\x21-\x7e]*")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# A field value of visible ASCII, spaces and tabs; obs-text and control bytes are left to
# aiohttp's stricter handling.
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e]*")

# Parsed X-Ephemwork values, because a bastion serves few distinct routes many times each.
_ROUTES: dict[bytes, RouteKey] = {}
_MAX_CACHED_ROUTES = 1024

# In the health check's path and the name of the query parameter that sets the cookie.
_BASTION_NAME = b"ephemwork"

# Headers that send the request to aiohttp: they change framing, request an interim
# response or a protocol switch, or call for CORS headers on the response.
_HANDED_OVER = frozenset(
    {b"transfer-encoding", b"expect", b"upgrade", b"origin", b"te", b"trailer"}
)
# Hop-by-hop headers that are dropped (RFC 9110 section 7.6.1), and the headers the
# bastion writes itself.
_DROPPED = frozenset({b"keep-alive", b"proxy-connection", b"host", b"x-forwarded-for"})
_CONNECTION_TOKENS = frozenset({b"keep-alive", b"close"})


@attrs.frozen
class PlainRequest:
    """A plain request head, ready to be sent to a tunnel port."""

    method: str
    # The request target as received, for example ``/orders?id=7``.
    target: str
    route: RouteKey
    # The header lines to pass on, each ending with CRLF, in the caller's order.
    passed_headers: bytes
    host: str
    # The X-Forwarded-For entries the caller sent, to which the bastion adds its peer.
    forwarded_for: tuple[str, ...]
    has_forwarded_proto: bool
    accept: str
    content_length: int
    keep_alive: bool
    # Bytes of the caller's buffer taken by the head, including the blank line.
    head_size: int

    def head_for_tunnel(self, port: int, peer: str) -> bytes:
        """Return the request head to send to the tunnel on *port*, for a caller at *peer*."""
        chain = ", ".join((*self.forwarded_for, peer)) if peer else ", ".join(self.forwarded_for)
        extra = f"X-Forwarded-For: {chain}\r\n" if chain else ""
        if not self.has_forwarded_proto:
            extra += "X-Forwarded-Proto: http\r\n"
        return b"".join(
            (
                f"{self.method} {self.target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode(),
                self.passed_headers,
                f"{extra}X-Forwarded-Host: {self.host}\r\n\r\n".encode(),
            )
        )


def may_be_plain(buffer: bytes | bytearray) -> bool:
    """Return whether the start of a request head, without its end yet, can still be plain.

    A head that cannot be plain is handed to aiohttp at once. So a malformed or non-HTTP
    start (a bare LF, a TLS handshake, a header line without a colon) gets aiohttp's
    immediate error instead of waiting for the header timeout.
    """
    if buffer.count(b"\n") != buffer.count(b"\r\n"):
        return False
    lines = bytes(buffer).split(b"\r\n")
    complete, partial = lines[:-1], lines[-1]

    if not complete:
        method, space, _ = partial.partition(b" ")
        if space:
            return method in PLAIN_METHODS
        return any(known.startswith(method) for known in PLAIN_METHODS)

    request_line = complete[0].split(b" ")
    if len(request_line) != 3 or request_line[2] != b"HTTP/1.1":
        return False
    if request_line[0] not in PLAIN_METHODS:
        return False
    for line in complete[1:]:
        name, colon, _ = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None:
            return False
    return True


def read_plain_request(buffer: bytes | bytearray, head_end: int) -> PlainRequest | None:
    """Parse the head ``buffer[:head_end]`` (ending before CRLF CRLF) if it is plain.

    Returns None when the request must go to aiohttp instead.
    """
    if head_end > MAX_PLAIN_HEAD:
        return None
    lines = bytes(buffer[:head_end]).split(b"\r\n")

    request_line = lines[0].split(b" ")
    if len(request_line) != 3 or request_line[2] != b"HTTP/1.1":
        return None
    method, target, _version = request_line
    if method not in PLAIN_METHODS or _TARGET.fullmatch(target) is None:
        return None
    if _names_bastion_resource(target):
        return None

    passed: list[bytes] = []
    route_values: list[bytes] = []
    hosts: list[bytes] = []
    lengths: list[bytes] = []
    forwarded_for: list[str] = []
    has_forwarded_proto = False
    accept = b""
    keep_alive = True

    for line in lines[1:]:
        name, colon, raw_value = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None:
            # Includes obs-fold continuation lines, which start with whitespace.
            return None
        value = raw_value.strip(b" \t")
        if _FIELD_VALUE.fullmatch(value) is None:
            return None

        lower = name.lower()
        if lower in _HANDED_OVER:
            return None
        if lower == b"connection":
            tokens = {token.strip().lower() for token in value.split(b",")}
            if not tokens <= _CONNECTION_TOKENS:
                return None
            keep_alive = keep_alive and b"close" not in tokens
            continue
        if lower in _DROPPED:
            if lower == b"host":
                hosts.append(value)
            elif lower == b"x-forwarded-for":
                if value:
                    forwarded_for.append(value.decode("ascii"))
            continue

        if lower == b"x-ephemwork":
            route_values.append(value)
        elif lower == b"content-length":
            lengths.append(value)
        elif lower == b"x-forwarded-proto":
            has_forwarded_proto = True
        elif lower == b"accept":
            accept = value
        passed.append(line + b"\r\n")

    if len(route_values) != 1 or len(hosts) != 1 or len(lengths) > 1:
        return None
    if lengths and not lengths[0].isdigit():
        return None
    route = _ROUTES.get(route_values[0])
    if route is None:
        try:
            route = parse_route_value(route_values[0].decode("ascii"))
        except InvalidRouteError:
            return None
        if len(_ROUTES) >= _MAX_CACHED_ROUTES:
            _ROUTES.clear()
        _ROUTES[route_values[0]] = route

    return PlainRequest(
        method=method.decode("ascii"),
        target=target.decode("ascii"),
        route=route,
        passed_headers=b"".join(passed),
        host=hosts[0].decode("ascii"),
        forwarded_for=tuple(forwarded_for),
        has_forwarded_proto=has_forwarded_proto,
        accept=accept.decode("ascii"),
        content_length=int(lengths[0]) if lengths else 0,
        keep_alive=keep_alive,
        head_size=head_end + 4,
    )


def _names_bastion_resource(target: bytes) -> bool:
    """Return whether *target* may name the health check or the ``ephemwork`` parameter.

    aiohttp decides on the percent-decoded path and query, where ``%2D`` is ``-`` and a
    parameter name without ``=`` counts, so any target with ``ephemwork`` in it, before or
    after decoding, goes to aiohttp.
    """
    if _BASTION_NAME in target.lower():
        return True
    if b"%" in target:
        return _BASTION_NAME in urllib.parse.unquote_to_bytes(target).lower()
    return False
