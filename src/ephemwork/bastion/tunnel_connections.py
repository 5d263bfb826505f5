"""Kept-alive connections from the relay to tunnel ports, and the responses read on them.

A `TunnelConnection` carries one request at a time to the bastion end of a laptop's reverse
forward and parses the response with httptools (llhttp, the parser aiohttp and Node.js use).
It turns the dev server's response into the bytes the caller receives: hop-by-hop headers
dropped, a Date added when missing, and a chunked body re-framed chunk by chunk. Responses
with a Content-Length of at most `SMALL_BODY_MAX` bytes reach the caller in one write.

Idle connections wait in a `TunnelPool` per port, most recently used first. They are closed
after `keepalive` seconds, below the 5 s keep-alive of common dev servers, so that a reused
connection is rarely one the dev server is closing at that moment.
"""

from __future__ import annotations

import asyncio
import email.utils
import enum
import time
from http import HTTPStatus
from typing import Protocol, cast

import httptools

from ephemwork.bastion.proxy import HOP_BY_HOP_HEADERS, SMALL_BODY_MAX, TUNNEL_HOST
from ephemwork.bastion.validation import invalid_response_header

# The hop-by-hop headers that the aiohttp path drops, as the bytes httptools reports.
HOP_BY_HOP = frozenset(name.encode("ascii") for name in HOP_BY_HOP_HEADERS)

_STATUS_LINES = {
    status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode() for status in HTTPStatus
}
_LAST_CHUNK = b"0\r\n\r\n"


class TunnelProblem(enum.Enum):
    """The reason a tunnel connection gave no complete response."""

    # Nothing listens on the tunnel port: the laptop's forward is gone.
    REFUSED = "refused"
    # The connection closed before a response began; the dev server is usually down.
    CLOSED = "closed"
    # The response could not be parsed, or it ended before the end its framing announced.
    MALFORMED = "malformed"
    # The response has a header that cannot be relayed unchanged.
    BAD_HEADER = "bad_header"
    # No response bytes within the read timeout.
    TIMEOUT = "timeout"


class ResponseSink(Protocol):
    """The receiver of a tunnel connection's response, usually the caller's relay."""

    def tunnel_data(self, data: bytes) -> None:
        """Send *data*, already framed for the caller, to the caller."""

    def tunnel_done(self, status: int) -> None:
        """Finish the exchange: every byte of the response was passed to `tunnel_data`."""

    def tunnel_failed(self, problem: TunnelProblem, detail: str) -> None:
        """Handle a failed response; *detail* is one line for the log and the error response."""

    def tunnel_pause_sending(self) -> None:
        """Stop reading the request body, because the tunnel's send buffer is full."""

    def tunnel_resume_sending(self) -> None:
        """Read the request body again, because the tunnel drained its send buffer."""


class _Date:
    """The Date header line, formatted again only when the second changes."""

    second: int = -1
    header: bytes = b""

    @classmethod
    def line(cls) -> bytes:
        now = int(time.time())
        if now != cls.second:
            cls.second = now
            cls.header = f"Date: {email.utils.formatdate(now, usegmt=True)}\r\n".encode()
        return cls.header


class TunnelConnection(asyncio.Protocol):
    """One connection to a tunnel port; carries requests one after another."""

    port: int
    # Whether the connection carried a response before the current request, so a close
    # without a response may be the dev server ending its idle keep-alive.
    reused: bool
    idle_since: float

    _pool: TunnelPool
    _transport: asyncio.Transport | None
    _parser: httptools.HttpResponseParser
    _sink: ResponseSink | None
    _caller_wants_close: bool
    _headers: list[tuple[bytes, bytes]]
    _status: int
    _keep_alive: bool
    _chunked: bool
    _until_close: bool
    _small: bytearray | None
    _complete: bool
    _extra_message: bool
    _problem: str | None
    _problem_kind: TunnelProblem
    # Whether every byte of the current request was written, and whether any response
    # byte arrived for it.
    _request_complete: bool
    _received_any: bool
    _last_read: float
    _timer: asyncio.TimerHandle | None

    def __init__(self, pool: TunnelPool, port: int) -> None:
        self.port = port
        self.reused = False
        self.idle_since = 0.0
        self._pool = pool
        self._transport = None
        self._parser = httptools.HttpResponseParser(self)
        self._sink = None
        self._caller_wants_close = False
        self._request_complete = True
        self._received_any = False
        self._timer = None
        self._last_read = 0.0
        self._reset()

    def _reset(self) -> None:
        self._headers = []
        self._status = 0
        self._keep_alive = False
        self._chunked = False
        self._until_close = False
        self._small = None
        self._complete = False
        self._extra_message = False
        self._problem = None
        self._problem_kind = TunnelProblem.MALFORMED

    # Requests.

    def send_request(
        self, sink: ResponseSink, data: bytes, *, caller_wants_close: bool, complete: bool
    ) -> None:
        """Send a request head, and any body bytes already at hand, for *sink*.

        *complete* is whether *data* contains the whole request. If it does not,
        `send_body` sends the rest.
        """
        assert self._transport is not None
        self._sink = sink
        self._caller_wants_close = caller_wants_close
        self._request_complete = complete
        self._received_any = False
        self._transport.write(data)
        self._last_read = self._pool.loop.time()
        self._timer = self._pool.loop.call_later(self._pool.read_timeout, self._check_silence)

    def send_body(self, data: bytes, *, last: bool) -> None:
        """Send more of the current request's body; *last* marks its final bytes."""
        self._request_complete = last
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def abandon(self) -> None:
        """Drop the current request: the caller went away, so the connection is closed."""
        self._sink = None
        self._cancel_timer()
        if self._transport is not None:
            self._transport.abort()

    def pause_reading(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    # asyncio.Protocol.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's does not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._sink is None:
            # An idle connection must stay silent; bytes here belong to no request.
            self._close()
            return
        self._last_read = self._pool.loop.time()
        self._received_any = True

        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._problem = "101 Switching Protocols to a request without Upgrade"
        except httptools.HttpParserError as exc:
            self._problem = str(exc) or type(exc).__name__

        if self._problem is not None:
            self._fail(self._problem_kind, self._problem)
        elif self._complete:
            # A dev server may answer before it read the whole body, for example with
            # 413; the body's rest would be read as the next request.
            reusable = self._keep_alive and self._request_complete and not self._extra_message
            self._finish(reusable=reusable)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._pool.forget(self)
        if self._sink is None:
            return
        if self._until_close:
            # A body without Content-Length or chunked framing ends when the connection does.
            self._deliver(_LAST_CHUNK)
            self._finish(reusable=False)
        elif self._received_any:
            self._fail(TunnelProblem.MALFORMED, "the connection closed before the response's end")
        else:
            detail = f"closed the connection ({exc!r})" if exc else "closed the connection"
            self._fail(TunnelProblem.CLOSED, detail)

    def pause_writing(self) -> None:
        if self._sink is not None:
            self._sink.tunnel_pause_sending()

    def resume_writing(self) -> None:
        if self._sink is not None:
            self._sink.tunnel_resume_sending()

    # httptools callbacks.

    def on_message_begin(self) -> None:
        if self._complete:
            self._extra_message = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            # An interim response (100 Continue, 103 Early Hints) is not relayed; the
            # parser reads the final response next.
            self._headers = []
            return
        self._status = status
        # llhttp resets this flag once the message is complete.
        self._keep_alive = self._parser.should_keep_alive()

        problem = invalid_response_header(self._headers)
        if problem is not None:
            self._problem = problem
            self._problem_kind = TunnelProblem.BAD_HEADER
            return

        head = self._caller_head(status)
        if self._small is not None:
            self._small += head
        else:
            self._deliver(head)

    def on_body(self, body: bytes) -> None:
        if self._problem is not None or self._extra_message:
            return
        if self._small is not None:
            self._small += body
        elif self._chunked:
            self._deliver(b"%x\r\n%b\r\n" % (len(body), body))
        else:
            self._deliver(body)

    def on_message_complete(self) -> None:
        if self._status == 0 or self._problem is not None or self._extra_message:
            return
        if self._small is not None:
            self._deliver(bytes(self._small))
        elif self._chunked:
            self._deliver(_LAST_CHUNK)
        self._complete = True

    # Internals.

    def _caller_head(self, status: int) -> bytes:
        """Return the status line and headers for the caller; decide the body's framing."""
        headers = self._headers
        dropped = HOP_BY_HOP
        content_length = None
        upstream_chunked = False
        has_date = False
        for name, value in headers:
            lower = name.lower()
            if lower == b"connection":
                dropped = dropped | {t.strip().lower() for t in value.split(b",")}
            elif lower == b"content-length":
                content_length = int(value)
            elif lower == b"transfer-encoding":
                upstream_chunked = True
            elif lower == b"date":
                has_date = True

        lines = [_STATUS_LINES.get(status) or f"HTTP/1.1 {status} \r\n".encode()]
        lines.extend(
            b"%b: %b\r\n" % (name, value)
            for name, value in headers
            if name.lower() not in dropped
            and not (status == 204 and name.lower() == b"content-length")
        )
        if not has_date:
            lines.append(_Date.line())

        if status in (204, 304):
            pass
        elif upstream_chunked or content_length is None:
            # llhttp decodes a chunked body; it is framed again for the caller. A body
            # that ends with the connection is chunked too, so the caller's connection
            # can be reused.
            self._chunked = True
            self._until_close = not upstream_chunked
            lines.append(b"Transfer-Encoding: chunked\r\n")
        elif content_length <= SMALL_BODY_MAX:
            self._small = bytearray()

        if self._caller_wants_close:
            lines.append(b"Connection: close\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def _deliver(self, data: bytes) -> None:
        if self._sink is not None:
            self._sink.tunnel_data(data)

    def _finish(self, *, reusable: bool) -> None:
        sink, status = self._sink, self._status
        self._sink = None
        self._cancel_timer()
        self._reset()
        self.reused = True
        if reusable and self._transport is not None and not self._transport.is_closing():
            # The caller's full send buffer may have paused reading in the last data_received.
            self._transport.resume_reading()
            self._pool.put(self)
        else:
            self._close()
        if sink is not None:
            sink.tunnel_done(status)

    def _fail(self, problem: TunnelProblem, detail: str) -> None:
        sink = self._sink
        self._sink = None
        self._cancel_timer()
        self._close()
        if sink is not None:
            sink.tunnel_failed(problem, detail)

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self._pool.forget(self)

    def _check_silence(self) -> None:
        self._timer = None
        if self._sink is None:
            return
        silent = self._pool.loop.time() - self._last_read
        if silent >= self._pool.read_timeout:
            self._fail(TunnelProblem.TIMEOUT, f"sent nothing for {self._pool.read_timeout} s")
        else:
            remaining = self._pool.read_timeout - silent
            self._timer = self._pool.loop.call_later(remaining, self._check_silence)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class TunnelPool:
    """Idle tunnel connections by port, and the opening of new ones."""

    loop: asyncio.AbstractEventLoop
    connect_timeout: float
    read_timeout: float
    keepalive: float
    _idle: dict[int, list[TunnelConnection]]
    _sweeper: asyncio.TimerHandle | None
    _closed: bool

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        connect_timeout: float,
        read_timeout: float | None,
        keepalive: float,
    ) -> None:
        self.loop = loop
        self.connect_timeout = connect_timeout
        # None means wait forever, which a day replaces so the timer logic stays simple.
        self.read_timeout = read_timeout if read_timeout is not None else 86_400.0
        self.keepalive = keepalive
        self._idle = {}
        self._sweeper = None
        self._closed = False

    def take(self, port: int) -> TunnelConnection | None:
        """Return an idle connection to *port*, most recently used first, or None."""
        idle = self._idle.get(port)
        while idle:
            connection = idle.pop()
            if self.loop.time() - connection.idle_since < self.keepalive:
                return connection
            connection.abandon()
        return None

    async def open(self, port: int) -> TunnelConnection:
        """Open a new connection to *port*; raise OSError or TimeoutError."""
        _transport, connection = await asyncio.wait_for(
            self.loop.create_connection(lambda: TunnelConnection(self, port), TUNNEL_HOST, port),
            self.connect_timeout,
        )
        return connection

    def put(self, connection: TunnelConnection) -> None:
        """Keep *connection* for the next request to its port."""
        if self._closed:
            connection.abandon()
            return
        connection.idle_since = self.loop.time()
        self._idle.setdefault(connection.port, []).append(connection)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.keepalive, self._sweep)

    def forget(self, connection: TunnelConnection) -> None:
        """Remove *connection* from the idle ones; it closed."""
        idle = self._idle.get(connection.port)
        if idle and connection in idle:
            idle.remove(connection)

    def close(self) -> None:
        """Close every idle connection and keep none from now on."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for connection in list(idle):
                connection.abandon()
        self._idle.clear()

    def _sweep(self) -> None:
        self._sweeper = None
        cutoff = self.loop.time() - self.keepalive
        for port, idle in list(self._idle.items()):
            for connection in [c for c in idle if c.idle_since <= cutoff]:
                connection.abandon()
            if not self._idle.get(port):
                self._idle.pop(port, None)
        if any(self._idle.values()):
            self._sweeper = self.loop.call_later(self.keepalive, self._sweep)
