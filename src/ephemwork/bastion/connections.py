"""The proxy's listening socket: slow-client timeouts and a per-address connection cap.

aiohttp closes a keep-alive connection that stays idle between requests, but it has no
timeout for a client that sends its request headers slowly and no limit on how many
connections one address holds. `ConnectionGuard` wraps each aiohttp protocol instance and
adds both:

- a connection must deliver complete request headers within ``header_timeout`` seconds of
  opening, and of the first byte of each later request on it;
- one client address may hold at most ``max_per_client`` connections at once. Behind a
  load balancer every connection comes from one of its nodes, so for a peer in
  ``trusted_proxies`` the client address is the right-most ``X-Forwarded-For`` entry that
  is not itself a trusted proxy, read from each request's headers. Without trusted proxies
  the cap applies per load balancer node.

It also replaces aiohttp's answers to unparseable requests with the proxy's error answers.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections import Counter
from collections.abc import Callable, Sequence
from typing import cast

import attrs
import structlog
from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler

from ephemwork.bastion.error_responses import error_response, new_request_id, raw_error_response
from ephemwork.bastion.relay import RelayContext, RelayProtocol
from ephemwork.bastion.validation import ALLOW_HEADER_VALUE

_HEADERS_END = b"\r\n\r\n"

# Request head bytes kept per connection from a trusted proxy, to read X-Forwarded-For.
# The ALB rejects request heads above 64 KiB.
_MAX_BUFFERED_HEAD = 64 * 1024

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

logger = structlog.get_logger()


@attrs.frozen
class ConnectionLimits:
    """Limits on the connections from callers to the proxy."""

    # Seconds to receive a request's headers, counted from the connection's start or from
    # the first byte of a later request on it.
    header_timeout: float = 10.0
    # Seconds a keep-alive connection may stay idle between requests. Longer than the ALB's
    # default 60 s idle timeout, so the ALB closes idle connections first and never sends a
    # request on one the bastion is closing.
    keepalive_timeout: float = 75.0
    # Concurrent connections from one client address.
    max_per_client: int = 256
    # Peers, such as the ALB's nodes, whose X-Forwarded-For names the client address.
    trusted_proxies: tuple[IPNetwork, ...] = ()


def parse_trusted_proxy(text: str) -> IPNetwork:
    """Parse a ``--trusted-proxy`` value, an address or a CIDR block such as ``10.0.0.0/16``.

    Raises ValueError with a sentence naming the value.
    """
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(
            f"{text!r} is not an IP address or CIDR block; use for example 10.0.0.0/16 "
            "for the subnets of the load balancer"
        ) from None


def is_trusted(address: str, trusted: Sequence[IPNetwork]) -> bool:
    """Return whether *address* lies in one of the *trusted* networks."""
    if not trusted:
        return False
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(parsed in network for network in trusted)


def forwarded_client(head: bytes, trusted: Sequence[IPNetwork]) -> str | None:
    """Return the client address that a trusted proxy's request head names, or None.

    *head* starts with the request line; anything after the blank line that ends the
    headers is ignored.

    It is the right-most ``X-Forwarded-For`` entry that is not a trusted proxy. Entries to
    its left were sent by the client and could be anything, so they are never used. None
    means the head has no such entry, or that entry is not an IP address.
    """
    entries: list[str] = []
    head = head.partition(_HEADERS_END)[0]
    for line in head.split(b"\r\n")[1:]:
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"x-forwarded-for":
            entries.extend(entry.strip() for entry in value.decode("latin-1").split(","))

    for entry in reversed(entries):
        if is_trusted(entry, trusted):
            continue
        try:
            return str(ipaddress.ip_address(entry))
        except ValueError:
            return None
    return None


class _ProxyRequestHandler(RequestHandler):
    """aiohttp's protocol with the proxy's error answers for requests it cannot parse."""

    # Called after each response is written, so the guard knows the connection is idle.
    response_finished: Callable[[], None] | None = None

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            if self.response_finished is not None:
                self.response_finished()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            # Part of a response was sent, so the connection can only be cut.
            return super().handle_error(request, status, exc, message)

        if isinstance(exc, http_exceptions.BadHttpMethod):
            response = error_response(
                request,
                405,
                "method_not_allowed",
                "the request method is not one this proxy passes on",
                headers={"Allow": ALLOW_HEADER_VALUE},
            )
        elif status >= 500:
            logger.error("proxy.handler_failed", error=repr(exc))
            response = error_response(
                request, status, "internal_error", "the bastion failed to handle the request"
            )
        else:
            # The parser's own message spans several lines and quotes raw bytes.
            reason = getattr(exc, "message", None) or message or "malformed request"
            reason = reason.splitlines()[0].rstrip(":")
            response = error_response(
                request, status, "bad_request", f"the request is malformed: {reason}"
            )
        response.force_close()
        return response


class ConnectionGuard:
    """Creates guarded protocol instances for one listening socket and counts connections."""

    limits: ConnectionLimits
    _server: web.Server
    _relay: RelayContext | None
    _per_client: Counter[str]

    def __init__(
        self, server: web.Server, limits: ConnectionLimits, relay: RelayContext | None = None
    ) -> None:
        self.limits = limits
        self._server = server
        self._relay = relay
        self._per_client = Counter()

    def __call__(self) -> asyncio.Protocol:
        """Return the protocol for one new connection."""
        # NOTE: mirrors web.Server.__call__ of aiohttp 3.14, which has no hook for the
        # handler class; zipapp/requirements.txt pins that release.
        handler = _ProxyRequestHandler(
            self._server,
            loop=asyncio.get_running_loop(),
            **self._server._kwargs,
        )
        protocol = _GuardedProtocol(handler, self)
        handler.response_finished = protocol.response_finished
        if self._relay is not None:
            protocol.inner = RelayProtocol(self._relay, handler, protocol.response_finished)
        return protocol

    def count(self, address: str) -> int:
        """Return how many connections *address* holds now."""
        return self._per_client[address]

    def opened(self, address: str) -> bool:
        """Count a new connection from *address*; return False if it exceeds the cap."""
        if self._per_client[address] >= self.limits.max_per_client:
            return False
        self._per_client[address] += 1
        return True

    def closed(self, address: str) -> None:
        """Forget one connection from *address*."""
        self._per_client[address] -= 1
        if self._per_client[address] <= 0:
            del self._per_client[address]


class _GuardedProtocol(asyncio.Protocol):
    """Passes every event on to the relay; enforces the header timeout and connection cap."""

    # The relay, which hands requests it does not serve to aiohttp, or aiohttp's protocol.
    inner: asyncio.Protocol
    _guard: ConnectionGuard
    _transport: asyncio.Transport | None
    _peer: str
    # Whether the peer is a trusted proxy, whose requests name the client in X-Forwarded-For.
    _behind_proxy: bool
    # The client address this connection counts against, or None while it counts against
    # none: before the first request from a trusted proxy, and after a rejection.
    _address: str | None
    _rejected: bool
    _inner_started: bool
    _waiting_for_headers: bool
    _idle: bool
    _received: bytearray
    # The current request's head, kept only for a trusted proxy's connection.
    _head: bytearray
    _timer: asyncio.TimerHandle | None
    _headers_deadline: float

    def __init__(self, inner: asyncio.Protocol, guard: ConnectionGuard) -> None:
        self.inner = inner
        self._guard = guard
        self._transport = None
        self._peer = "unknown"
        self._behind_proxy = False
        self._address = None
        self._rejected = False
        self._inner_started = False
        self._waiting_for_headers = True
        self._idle = False
        self._received = bytearray()
        self._head = bytearray()
        self._timer = None
        self._headers_deadline = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's does not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if peer else "unknown"
        self._behind_proxy = is_trusted(self._peer, self._guard.limits.trusted_proxies)

        # A trusted proxy's connection is counted once its first request names the client.
        if not self._behind_proxy and not self._count_against(self._peer):
            return

        self._arm_timer()
        self._inner_started = True
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        headers_complete = False
        if self._waiting_for_headers:
            headers_complete = self._scan_for_headers_end(data)
        elif self._idle:
            # The first byte of the next request on a keep-alive connection.
            self._idle = False
            self._waiting_for_headers = True
            self._received.clear()
            self._arm_timer()
            headers_complete = self._scan_for_headers_end(data)

        if headers_complete and self._behind_proxy:
            head = bytes(self._head)
            self._head.clear()
            client = forwarded_client(head, self._guard.limits.trusted_proxies)
            # Without a usable X-Forwarded-For entry the proxy itself is the client.
            if not self._count_against(client or self._peer):
                return

        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._inner_started and not self._rejected:
            self.inner.eof_received()
        # None closes the transport, as aiohttp's own protocol does.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._address is not None:
            self._guard.closed(self._address)
            self._address = None
        if self._inner_started:
            self.inner.connection_lost(exc)

    def response_finished(self) -> None:
        """Mark the connection idle: the next byte starts a new request's headers."""
        self._idle = not self._waiting_for_headers

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def _count_against(self, address: str) -> bool:
        """Move this connection's count to *address*; reject the connection if it is full."""
        if address == self._address:
            return True
        if self._address is not None:
            self._guard.closed(self._address)
            self._address = None

        if self._guard.opened(address):
            self._address = address
            return True

        self._rejected = True
        self._cancel_timer()
        request_id = new_request_id()
        cap = self._guard.limits.max_per_client
        logger.info(
            "proxy.connection_rejected",
            request_id=request_id,
            remote=address,
            peer=self._peer,
            max_per_client=cap,
        )
        assert self._transport is not None
        self._transport.write(
            raw_error_response(
                503,
                "too_many_connections",
                f"client address {address} already holds {cap} connections, the maximum",
                request_id,
            )
        )
        self._transport.close()
        return False

    def _scan_for_headers_end(self, data: bytes) -> bool:
        """Return whether *data* completes the request's headers."""
        if self._behind_proxy and len(self._head) < _MAX_BUFFERED_HEAD:
            # Body bytes after the head may come along; forwarded_client stops at the head's end.
            self._head += data[: _MAX_BUFFERED_HEAD - len(self._head)]

        # Keep the last three bytes of earlier chunks, so an end split across two reads
        # is still found.
        window = bytes(self._received[-3:]) + data
        if _HEADERS_END not in window:
            self._received += data[-3:]
            return False

        # The timer stays armed: it finds the headers complete when it fires.
        self._waiting_for_headers = False
        self._received.clear()
        return True

    def _arm_timer(self) -> None:
        """Give the request's headers `header_timeout` seconds from now.

        A timer that is already armed is kept and re-armed for the new deadline when it
        fires, so a busy keep-alive connection does not create a timer per request.
        """
        loop = asyncio.get_running_loop()
        self._headers_deadline = loop.time() + self._guard.limits.header_timeout
        if self._timer is None:
            self._timer = loop.call_at(self._headers_deadline, self._headers_timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_timed_out(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or transport.is_closing() or not self._waiting_for_headers:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._headers_deadline:
            self._timer = loop.call_at(self._headers_deadline, self._headers_timed_out)
            return

        request_id = new_request_id()
        timeout = self._guard.limits.header_timeout
        logger.info(
            "proxy.header_timeout",
            request_id=request_id,
            remote=self._address or self._peer,
            header_timeout=timeout,
            bytes_received=bool(self._received),
        )
        if self._received:
            transport.write(
                raw_error_response(
                    408,
                    "header_timeout",
                    f"the request headers did not arrive within {timeout} s",
                    request_id,
                )
            )
        transport.close()


def guarded_protocol_factory(
    server: web.Server, limits: ConnectionLimits, relay: RelayContext | None = None
) -> Callable[[], asyncio.Protocol]:
    """Return a protocol factory for ``loop.create_server`` that applies *limits*.

    With *relay*, plain requests are relayed directly and the rest served by *server*.
    """
    return ConnectionGuard(server, limits, relay)


__all__: list[str] = [
    "ConnectionGuard",
    "ConnectionLimits",
    "forwarded_client",
    "guarded_protocol_factory",
    "is_trusted",
    "parse_trusted_proxy",
]
