"""The proxy's listening socket: slow-client timeouts and a per-address connection cap.

aiohttp closes a keep-alive connection that stays idle between requests, but it has no
timeout for a client that sends its request headers slowly and no limit on how many
connections one address holds. `ConnectionGuard` wraps each aiohttp protocol instance and
adds both:

- a connection must deliver complete request headers within ``header_timeout`` seconds of
  opening, and of the first byte of each later request on it;
- one client address may hold at most ``max_per_client`` connections at once. Behind a
  load balancer every connection comes from one of its nodes, so the cap applies per node.

It also replaces aiohttp's answers to unparseable requests with the proxy's error answers.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import attrs
import structlog
from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler

from ephemwork.bastion.error_responses import error_response, new_request_id, raw_error_response
from ephemwork.bastion.validation import ALLOW_HEADER_VALUE

_HEADERS_END = b"\r\n\r\n"

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
    _per_client: Counter[str]

    def __init__(self, server: web.Server, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._server = server
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
    """Passes every event on to aiohttp's protocol and enforces the header timeout."""

    _inner: _ProxyRequestHandler
    _guard: ConnectionGuard
    _transport: asyncio.Transport | None
    _address: str | None
    _waiting_for_headers: bool
    _idle: bool
    _received: bytearray
    _timer: asyncio.TimerHandle | None

    def __init__(self, inner: _ProxyRequestHandler, guard: ConnectionGuard) -> None:
        self._inner = inner
        self._guard = guard
        self._transport = None
        self._address = None
        self._waiting_for_headers = True
        self._idle = False
        self._received = bytearray()
        self._timer = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if peer else "unknown"

        if not self._guard.opened(address):
            request_id = new_request_id()
            cap = self._guard.limits.max_per_client
            logger.info(
                "proxy.connection_rejected",
                request_id=request_id,
                remote=address,
                max_per_client=cap,
            )
            transport.write(
                raw_error_response(
                    503,
                    "too_many_connections",
                    f"client address {address} already holds {cap} connections, the maximum",
                    request_id,
                )
            )
            transport.close()
            return

        self._address = address
        self._arm_timer()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._address is None:
            return
        if self._waiting_for_headers:
            self._scan_for_headers_end(data)
        elif self._idle:
            # The first byte of the next request on a keep-alive connection.
            self._idle = False
            self._waiting_for_headers = True
            self._received.clear()
            self._arm_timer()
            self._scan_for_headers_end(data)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._address is not None:
            self._inner.eof_received()
        # None closes the transport, as aiohttp's own protocol does.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._address is None:
            return
        self._guard.closed(self._address)
        self._inner.connection_lost(exc)

    def response_finished(self) -> None:
        """Mark the connection idle: the next byte starts a new request's headers."""
        self._idle = not self._waiting_for_headers

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _scan_for_headers_end(self, data: bytes) -> None:
        # Keep the last three bytes of earlier chunks, so an end split across two reads
        # is still found.
        window = bytes(self._received[-3:]) + data
        if _HEADERS_END in window:
            self._waiting_for_headers = False
            self._received.clear()
            self._cancel_timer()
        else:
            self._received += data[-3:]

    def _arm_timer(self) -> None:
        self._cancel_timer()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._guard.limits.header_timeout, self._headers_timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_timed_out(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or transport.is_closing() or not self._waiting_for_headers:
            return

        request_id = new_request_id()
        timeout = self._guard.limits.header_timeout
        logger.info(
            "proxy.header_timeout",
            request_id=request_id,
            remote=self._address,
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
    server: web.Server, limits: ConnectionLimits
) -> Callable[[], asyncio.Protocol]:
    """Return a protocol factory for ``loop.create_server`` that applies *limits*."""
    return ConnectionGuard(server, limits)


__all__: list[str] = ["ConnectionGuard", "ConnectionLimits", "guarded_protocol_factory"]
