"""The caller's side of the proxy: plain requests are relayed directly, the rest by aiohttp.

`RelayProtocol` reads each request head on a caller's connection. When
`ephemwork.bastion.plain_request` finds it plain and the route is registered, the head is
rewritten and sent over a kept-alive `TunnelConnection`, and the body follows as it arrives.
The response comes back through the same connection object, with no task, stream or header
dictionary in between. This path costs about a fifth of aiohttp's CPU per request. That
matters because every routed request of every developer passes through this one process.

Any other request hands the connection to aiohttp's protocol, with the bytes read so far,
and aiohttp serves it from then on, so every feature and error response of
`ephemwork.bastion.proxy` applies unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import cast

import attrs
import structlog

from ephemwork.bastion.error_responses import (
    accepts_json,
    new_request_id,
    raw_error_response,
    tunnel_bad_header_message,
    tunnel_closed_message,
    tunnel_malformed_message,
    tunnel_not_connected_message,
    tunnel_timeout_message,
)
from ephemwork.bastion.plain_request import (
    MAX_PLAIN_HEAD,
    PlainRequest,
    may_be_plain,
    read_plain_request,
)
from ephemwork.bastion.proxy import ProxyTimeouts, RouteTable
from ephemwork.bastion.tunnel_connections import TunnelConnection, TunnelPool, TunnelProblem
from ephemwork.wire import Session

_HEADERS_END = b"\r\n\r\n"

# Bytes of a next, pipelined request kept while the current one is in progress. Beyond
# this, the caller's connection is not read until the current response is complete.
_MAX_PIPELINED = 64 * 1024

# Bytes of a request body kept while the tunnel connection opens; beyond this the caller's
# connection is not read until it is open.
_MAX_BUFFERED_BODY = 256 * 1024

# Methods that may be sent again on a fresh connection when a reused one closed without
# any response byte (RFC 9110 section 9.2.2), as long as they carry no body.
_RETRIED_METHODS = frozenset({"GET", "PUT", "DELETE"})

logger = structlog.get_logger()


@attrs.define
class RelayContext:
    """The state shared by every relay of one listening socket."""

    routes: RouteTable
    timeouts: ProxyTimeouts
    pool: TunnelPool
    keepalive_timeout: float
    open_relays: set[RelayProtocol] = attrs.field(factory=set)
    closing: bool = False
    # Set when the last connection closes during shutdown.
    drained: asyncio.Event | None = None

    async def shutdown(self, grace: float) -> None:
        """Close idle connections, give requests in progress *grace* seconds, cut the rest."""
        self.closing = True
        for relay in list(self.open_relays):
            relay.close_if_idle()

        if self.open_relays:
            self.drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self.drained.wait()

        for relay in list(self.open_relays):
            relay.abort()
        self.pool.close()

    def forget(self, relay: RelayProtocol) -> None:
        """Drop *relay*, whose connection closed."""
        self.open_relays.discard(relay)
        if not self.open_relays and self.drained is not None:
            self.drained.set()


@attrs.define
class _Exchange:
    """The plain request in progress on a caller's connection."""

    request: PlainRequest
    session: Session
    request_id: str
    # The head and body bytes sent so far, kept while a retry is still possible.
    sent: bytearray
    body_remaining: int
    tunnel: TunnelConnection | None = None
    connecting: asyncio.Task[TunnelConnection] | None = None
    answered: bool = False
    retried: bool = False


class RelayProtocol(asyncio.Protocol):
    """One caller connection: plain requests relayed here, the rest handed to aiohttp."""

    _context: RelayContext
    _aiohttp: asyncio.Protocol
    _response_finished: Callable[[], None]
    _transport: asyncio.Transport | None
    _peer: str
    _buffer: bytearray
    _exchange: _Exchange | None
    _handed_over: bool
    _reading_paused: bool
    _idle_timer: asyncio.TimerHandle | None
    _idle_since: float

    def __init__(
        self,
        context: RelayContext,
        aiohttp_protocol: asyncio.Protocol,
        response_finished: Callable[[], None],
    ) -> None:
        self._context = context
        self._aiohttp = aiohttp_protocol
        self._response_finished = response_finished
        self._transport = None
        self._peer = ""
        self._buffer = bytearray()
        self._exchange = None
        self._handed_over = False
        self._reading_paused = False
        self._idle_timer = None
        self._idle_since = 0.0

    # asyncio.Protocol, called by the connection guard.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's does not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if peer else ""
        self._context.open_relays.add(self)
        self._mark_idle()

    def data_received(self, data: bytes) -> None:
        if self._handed_over:
            self._aiohttp.data_received(data)
            return

        exchange = self._exchange
        if exchange is not None and exchange.body_remaining > 0:
            body = data[: exchange.body_remaining]
            self._send_body(exchange, body)
            data = data[len(body) :]
            if not data:
                return

        self._buffer += data
        if exchange is None:
            self._next_request()
        elif len(self._buffer) > _MAX_PIPELINED:
            self._pause_reading()

    def eof_received(self) -> bool | None:
        if self._handed_over:
            return self._aiohttp.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._context.forget(self)
        self._cancel_idle_timer()
        self._transport = None
        if self._handed_over:
            self._aiohttp.connection_lost(exc)
            return
        exchange, self._exchange = self._exchange, None
        if exchange is not None:
            # The caller went away; the tunnel connection is mid-request and cannot be reused.
            if exchange.connecting is not None:
                exchange.connecting.cancel()
            if exchange.tunnel is not None:
                exchange.tunnel.abandon()
            logger.debug("proxy.client_disconnected", request_id=exchange.request_id)

    def pause_writing(self) -> None:
        if self._handed_over:
            self._aiohttp.pause_writing()
        elif self._exchange is not None and self._exchange.tunnel is not None:
            self._exchange.tunnel.pause_reading()

    def resume_writing(self) -> None:
        if self._handed_over:
            self._aiohttp.resume_writing()
        elif self._exchange is not None and self._exchange.tunnel is not None:
            self._exchange.tunnel.resume_reading()

    # Shutdown.

    def close_if_idle(self) -> None:
        """Close the connection now if no request is in progress on it."""
        if self._handed_over:
            return
        if self._exchange is None and self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Cut the connection, whatever it is doing."""
        if self._transport is not None:
            self._transport.abort()

    # ResponseSink, called by the tunnel connection.

    def tunnel_data(self, data: bytes) -> None:
        if self._exchange is not None:
            self._exchange.answered = True
        if self._transport is not None:
            self._transport.write(data)

    def tunnel_done(self, status: int) -> None:
        exchange, self._exchange = self._exchange, None
        if exchange is None:
            return
        request = exchange.request
        logger.info(
            "proxy.request_forwarded",
            request_id=exchange.request_id,
            route=str(request.route),
            port=exchange.session.port,
            route_source="header",
            method=request.method,
            path=request.target.partition("?")[0],
            status=status,
        )
        self._request_finished(request.keep_alive and exchange.body_remaining == 0)

    def tunnel_failed(self, problem: TunnelProblem, detail: str) -> None:
        exchange = self._exchange
        if exchange is None:
            return
        reused = exchange.tunnel is not None and exchange.tunnel.reused
        exchange.tunnel = None

        if problem is TunnelProblem.CLOSED and reused and self._may_retry(exchange):
            logger.info(
                "proxy.tunnel_retried",
                request_id=exchange.request_id,
                port=exchange.session.port,
                reason=detail,
            )
            exchange.retried = True
            self._connect(exchange)
            return

        self._exchange = None
        if exchange.answered:
            # The status line is already sent, so the only honest signal left is to close
            # the connection before the body's end.
            logger.warning(
                "proxy.tunnel_failed_mid_body",
                request_id=exchange.request_id,
                route=str(exchange.request.route),
                error=detail,
            )
            self.abort()
            return

        route, port = str(exchange.request.route), exchange.session.port
        if problem is TunnelProblem.TIMEOUT:
            timeouts = self._context.timeouts
            status, code = 504, "tunnel_timeout"
            message = tunnel_timeout_message(route, timeouts.connect, timeouts.read)
        elif problem is TunnelProblem.REFUSED:
            status, code = 502, "tunnel_unavailable"
            message = tunnel_not_connected_message(route, port)
        elif problem is TunnelProblem.CLOSED:
            status, code = 502, "tunnel_unavailable"
            message = tunnel_closed_message(route, port)
        elif problem is TunnelProblem.BAD_HEADER:
            status, code = 502, "tunnel_unavailable"
            message = tunnel_bad_header_message(route, detail)
        else:
            status, code = 502, "tunnel_unavailable"
            message = tunnel_malformed_message(route, detail)
        logger.warning(
            "proxy.tunnel_unavailable", request_id=exchange.request_id, route=route, error=detail
        )
        self._answer(exchange, status, code, message)

    def tunnel_pause_sending(self) -> None:
        self._pause_reading()

    def tunnel_resume_sending(self) -> None:
        self._resume_reading()

    # Internals.

    def _next_request(self) -> None:
        """Start the request at the front of the buffer if its head is complete."""
        if self._transport is None or self._transport.is_closing():
            return
        head_end = self._buffer.find(_HEADERS_END)
        if head_end < 0:
            if len(self._buffer) > MAX_PLAIN_HEAD or not may_be_plain(self._buffer):
                self._hand_over()
            return

        request = read_plain_request(self._buffer, head_end)
        session = self._context.routes.lookup(request.route) if request is not None else None
        if request is None or session is None:
            # An unknown route goes to aiohttp too, for the proxy's 404 message.
            self._hand_over()
            return

        body = bytes(self._buffer[request.head_size : request.head_size + request.content_length])
        del self._buffer[: request.head_size + len(body)]
        head = request.head_for_tunnel(session.port, self._peer)
        exchange = _Exchange(
            request=request,
            session=session,
            request_id=new_request_id(),
            sent=bytearray(head + body),
            body_remaining=request.content_length - len(body),
        )
        self._exchange = exchange

        tunnel = self._context.pool.take(session.port)
        if tunnel is None:
            self._connect(exchange)
        else:
            exchange.tunnel = tunnel
            self._send_request(exchange, tunnel)

    def _connect(self, exchange: _Exchange) -> None:
        task = asyncio.ensure_future(self._context.pool.open(exchange.session.port))
        exchange.connecting = task
        task.add_done_callback(lambda done: self._connected(exchange, done))

    def _connected(self, exchange: _Exchange, task: asyncio.Task[TunnelConnection]) -> None:
        exchange.connecting = None
        if task.cancelled() or self._exchange is not exchange:
            if not task.cancelled() and task.exception() is None:
                task.result().abandon()
            return

        error = task.exception()
        if isinstance(error, TimeoutError):
            self.tunnel_failed(TunnelProblem.TIMEOUT, "the connect timed out")
            return
        if error is not None:
            self.tunnel_failed(TunnelProblem.REFUSED, repr(error))
            return

        tunnel = task.result()
        exchange.tunnel = tunnel
        self._send_request(exchange, tunnel)

    def _send_request(self, exchange: _Exchange, tunnel: TunnelConnection) -> None:
        # Reading resumes first, so that a full tunnel send buffer can pause it again.
        self._resume_reading()
        tunnel.send_request(
            self,
            bytes(exchange.sent),
            caller_wants_close=not exchange.request.keep_alive,
            complete=exchange.body_remaining == 0,
        )

    def _send_body(self, exchange: _Exchange, body: bytes) -> None:
        exchange.body_remaining -= len(body)
        if exchange.tunnel is not None:
            exchange.tunnel.send_body(body, last=exchange.body_remaining == 0)
        else:
            exchange.sent += body
            if len(exchange.sent) > _MAX_BUFFERED_BODY:
                # The tunnel connection is still opening; `_send_request` reads on.
                self._pause_reading()

    def _may_retry(self, exchange: _Exchange) -> bool:
        """Return whether a request that a reused connection dropped may go on a fresh one.

        A dev server may close an idle keep-alive connection just as a request is sent on it.
        """
        return (
            not exchange.retried
            and not exchange.answered
            and exchange.request.content_length == 0
            and exchange.request.method in _RETRIED_METHODS
        )

    def _answer(self, exchange: _Exchange, status: int, code: str, message: str) -> None:
        """Send the bastion's own error response for *exchange*."""
        keep_alive = exchange.request.keep_alive and exchange.body_remaining == 0
        logger.info(
            "proxy.request_rejected",
            request_id=exchange.request_id,
            status=status,
            code=code,
            reason=message,
            method=exchange.request.method,
            path=exchange.request.target.partition("?")[0],
            remote=self._peer,
        )
        if self._transport is not None:
            self._transport.write(
                raw_error_response(
                    status,
                    code,
                    message,
                    exchange.request_id,
                    as_json=accepts_json(exchange.request.accept),
                    close=not keep_alive,
                )
            )
        self._request_finished(keep_alive)

    def _request_finished(self, keep_alive: bool) -> None:
        transport = self._transport
        if transport is None:
            return
        if not keep_alive or self._context.closing:
            transport.close()
            return

        self._response_finished()
        self._resume_reading()
        self._mark_idle()
        if self._buffer:
            self._next_request()

    def _hand_over(self) -> None:
        """Let aiohttp serve this connection from now on, starting with the buffered bytes."""
        assert self._transport is not None
        self._handed_over = True
        self._cancel_idle_timer()
        # From now on aiohttp's server closes this connection at shutdown.
        self._context.forget(self)
        self._aiohttp.connection_made(self._transport)
        if self._reading_paused:
            self._resume_reading()
        buffered = bytes(self._buffer)
        self._buffer.clear()
        if buffered:
            self._aiohttp.data_received(buffered)

    def _pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()

    def _mark_idle(self) -> None:
        """Close the connection if no next request starts within the keep-alive timeout."""
        loop = self._context.pool.loop
        self._idle_since = loop.time()
        if self._idle_timer is None:
            self._idle_timer = loop.call_later(self._context.keepalive_timeout, self._check_idle)

    def _check_idle(self) -> None:
        self._idle_timer = None
        if self._exchange is not None or self._handed_over or self._transport is None:
            return
        loop = self._context.pool.loop
        idle = loop.time() - self._idle_since
        if idle >= self._context.keepalive_timeout:
            self._transport.close()
        else:
            self._idle_timer = loop.call_later(
                self._context.keepalive_timeout - idle, self._check_idle
            )

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
