"""The routing proxy: ``X-Ephemwork: <user>:<service>`` selects a tunnel port on loopback.

Each request is checked, its route selected (header, then ``baggage``, then cookie; see
`ephemwork.bastion.routing`), looked up in the in-memory registry and streamed to
``http://127.0.0.1:<port>``, the bastion end of the laptop's reverse SSH forward. Bodies
are relayed chunk by chunk in both directions, and ``await response.write`` waits for the
client to drain before the next chunk is read. The one exception is a response body with a
Content-Length of at most 64 KiB, which is read whole and sent with the headers in one write.
A GET with ``Upgrade: websocket`` is relayed frame by frame (`ephemwork.bastion.websocket`),
and the caller's 101 carries the end-to-end headers of the dev server's 101, such as
Set-Cookie.

Answers that the proxy generates itself (`ephemwork.bastion.error_responses`) carry a request id:

- ``GET /ephemwork-health``: 200 ``ok`` for the load balancer's health check;
- a CORS preflight that lists ``x-ephemwork``: 204 with CORS headers for an allowed
  origin, 403 without them for any other;
- ``?ephemwork=<user>:<service>``: 307 to the same URL without it, setting the route cookie;
- a method outside the standard and registered ones: 405;
- ambiguous framing, a malformed route, an upgrade other than WebSocket: 400;
- no route, or a route no laptop registered: 404 naming the value;
- a registered route whose tunnel port refuses or drops the connection, or that answers
  with a malformed response: 502;
- a tunnel that does not respond within the connect or read timeout: 504.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from contextvars import ContextVar
from typing import Protocol

import aiohttp
import attrs
import structlog
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ephemwork.bastion.cookies import (
    route_cookie,
    same_origin_location,
    split_route_parameter,
)
from ephemwork.bastion.cors import (
    OriginAllowlist,
    actual_response_headers,
    is_route_preflight,
    preflight_headers,
)
from ephemwork.bastion.error_responses import (
    REQUEST_ID_HEADER,
    error_response,
    request_id_of,
    tunnel_bad_header_message,
    tunnel_closed_message,
    tunnel_malformed_message,
    tunnel_not_connected_message,
    tunnel_timeout_message,
)
from ephemwork.bastion.routing import (
    InvalidRouteError,
    SelectedRoute,
    parse_route_value,
    select_route,
)
from ephemwork.bastion.validation import (
    ALLOW_HEADER_VALUE,
    ALLOWED_METHODS,
    FramingError,
    check_request_framing,
    invalid_response_header,
    upgrade_protocols,
)
from ephemwork.bastion.websocket import MAX_MESSAGE_SIZE, relay_websocket
from ephemwork.wire import ROUTE_HEADER, RouteKey, Session

HEALTH_PATH = "/ephemwork-health"

# The tunnel ports listen on the bastion's own loopback (sshd or the embedded SSH server).
TUNNEL_HOST = "127.0.0.1"

# Hop-by-hop headers (RFC 9110 section 7.6.1), plus Proxy-Connection, which old clients
# send, and Trailer, which describes a chunked framing this proxy does not relay as is.
HOP_BY_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

# Request headers not passed on as they are. aiohttp sends "100 Continue" itself before
# the handler reads the body, so the tunnel must not wait for a second interim response
# (Expect). X-Forwarded-For is sent again with the caller's address appended.
_DROPPED_REQUEST_HEADERS = frozenset({"host", "expect", "x-forwarded-for"})
_DROPPED_REQUEST_HEADERS_NO_CONNECTION = HOP_BY_HOP_HEADERS | _DROPPED_REQUEST_HEADERS

# aiohttp's WebSocket client writes its own handshake headers.
_WEBSOCKET_HANDSHAKE_HEADERS = (
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Protocol",
    "Sec-WebSocket-Accept",
)

# Headers of the dev server's 101 response that describe only its connection to the
# bastion. The bastion completes the caller's handshake itself, with its own accept key and
# the extensions it negotiated with the caller.
_UPGRADE_OWN_HEADERS = frozenset({"content-length", "content-type"})
_UPGRADE_OWN_PREFIX = "sec-websocket-"

# Bytes of Content-Length up to which a response is read whole and sent in one write.
# Larger and unsized bodies (chunked, server-sent events) are relayed as they arrive.
SMALL_BODY_MAX = 64 * 1024

TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"

# The 101 responses received by the WebSocket handshake that runs in the current task.
# aiohttp's ClientWebSocketResponse does not expose the handshake response, but the
# client's request-end trace hook runs in the task that called ws_connect.
_upgrade_responses: ContextVar[list[aiohttp.ClientResponse] | None] = ContextVar(
    "upgrade_responses", default=None
)

logger = structlog.get_logger()


class RouteTable(Protocol):
    """The route lookup the proxy uses, such as `SessionRegistry`."""

    def lookup(self, route: RouteKey) -> Session | None:
        """Return the session serving *route*, or ``None``."""


@attrs.frozen
class ProxyTimeouts:
    """Timeouts, in seconds, for the connection from the proxy to a tunnel port."""

    # The tunnel port is on loopback, so a healthy connect takes microseconds.
    connect: float = 5.0
    # Maximum silence while waiting for response headers or between two body chunks. It
    # exceeds the ALB's default 60 s idle timeout, so the ALB decides when to give up on a
    # slow dev server; None waits forever (server-sent events with long gaps).
    read: float | None = 75.0
    # Idle keep-alive connections to a tunnel port are closed after this many seconds,
    # below the 5 s keep-alive of common dev servers (uvicorn), so a reused connection
    # is rarely one the dev server is closing.
    keepalive: float = 4.0
    # Seconds an upgraded WebSocket connection may carry no frame in either direction.
    # Longer than the ALB's 60 s idle timeout; Vite's client pings every 30 s.
    websocket_idle: float = 300.0


CLIENT_SESSION_KEY = web.AppKey("proxy_client_session", aiohttp.ClientSession)


def create_proxy_app(
    routes: RouteTable,
    *,
    timeouts: ProxyTimeouts = ProxyTimeouts(),
    cors: OriginAllowlist = OriginAllowlist(),
) -> web.Application:
    """Build the proxy application; one shared client session is opened on startup."""
    app = web.Application()
    app.cleanup_ctx.append(_client_session_context(timeouts))
    app.router.add_route("*", "/{tail:.*}", _ProxyHandler(routes, timeouts, cors).handle)
    return app


def hop_by_hop_names(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    """Return the lower-case names of the hop-by-hop headers of one message.

    They are the fixed set plus every name listed in the message's Connection headers.
    """
    values = headers.getall("Connection", ())
    if not values:
        return HOP_BY_HOP_HEADERS

    listed = {
        token.strip().lower() for value in values for token in value.split(",") if token.strip()
    }
    return HOP_BY_HOP_HEADERS | listed


def forwarded_request_headers(
    headers: CIMultiDictProxy[str], *, remote: str | None, scheme: str, host: str
) -> CIMultiDict[str]:
    """Return the headers to send to the tunnel for a request with *headers*.

    Hop-by-hop headers and Host are dropped (the client sets Host for the tunnel port),
    the caller's address is appended to X-Forwarded-For, and X-Forwarded-Host carries the
    original Host. An X-Forwarded-Proto set by the load balancer in front is kept, because
    the load balancer terminates the browser's TLS connection. Without one, this request's
    scheme is used.
    """
    if "Connection" in headers:
        dropped = hop_by_hop_names(headers) | _DROPPED_REQUEST_HEADERS
    else:
        dropped = _DROPPED_REQUEST_HEADERS_NO_CONNECTION
    forwarded: CIMultiDict[str] = CIMultiDict(
        (name, value) for name, value in headers.items() if name.lower() not in dropped
    )

    chain = [value.strip() for value in headers.getall("X-Forwarded-For", []) if value.strip()]
    if remote:
        chain.append(remote)
    if chain:
        forwarded["X-Forwarded-For"] = ", ".join(chain)

    forwarded.setdefault("X-Forwarded-Proto", scheme)
    forwarded["X-Forwarded-Host"] = host
    return forwarded


def relayed_response_headers(headers: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    """Return the tunnel's response headers minus hop-by-hop ones, repeats kept in order."""
    dropped = hop_by_hop_names(headers)
    return [(name, value) for name, value in headers.items() if name.lower() not in dropped]


def upgrade_response_headers(headers: CIMultiDictProxy[str]) -> Iterable[tuple[str, str]]:
    """Yield the headers of the dev server's 101 response that the caller's 101 carries too.

    They are the end-to-end ones, such as Set-Cookie. Hop-by-hop headers, Content-Length,
    Content-Type and every ``Sec-WebSocket-*`` header are left out, because they describe the
    handshake between the bastion and the dev server.
    """
    for name, value in relayed_response_headers(headers):
        lower = name.lower()
        if lower in _UPGRADE_OWN_HEADERS or lower.startswith(_UPGRADE_OWN_PREFIX):
            continue
        yield name, value


async def _record_upgrade_response(
    session: aiohttp.ClientSession,
    context: object,
    params: aiohttp.TraceRequestEndParams,
) -> None:
    sink = _upgrade_responses.get()
    if sink is not None and params.response.status == 101:
        sink.append(params.response)


def _client_session_context(
    timeouts: ProxyTimeouts,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(
            # No global cap: each tunnel port is one laptop, and queueing one developer's
            # requests behind another's would be surprising.
            limit=0,
            keepalive_timeout=timeouts.keepalive,
        )
        tracing = aiohttp.TraceConfig()
        tracing.on_request_end.append(_record_upgrade_response)
        session = aiohttp.ClientSession(
            connector=connector,
            trace_configs=[tracing],
            # Bodies are relayed as the dev server encoded them.
            auto_decompress=False,
            # A shared jar would hand one developer's cookies to another's requests.
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=timeouts.connect, sock_read=timeouts.read
            ),
            # Send only what the caller sent: an added Accept-Encoding would let the dev
            # server compress a body the caller cannot decode.
            skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
        )
        app[CLIENT_SESSION_KEY] = session
        try:
            yield
        finally:
            await session.close()

    return context


class _ProxyHandler:
    """The catch-all request handler."""

    _routes: RouteTable
    _timeouts: ProxyTimeouts
    _cors: OriginAllowlist

    def __init__(self, routes: RouteTable, timeouts: ProxyTimeouts, cors: OriginAllowlist) -> None:
        self._routes = routes
        self._timeouts = timeouts
        self._cors = cors

    async def handle(self, request: web.Request) -> web.StreamResponse:
        request_id = request_id_of(request)
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            return await self._handle(request)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ALLOWED_METHODS:
            return error_response(
                request,
                405,
                "method_not_allowed",
                f"method {request.method!r} is not passed on; use a standard HTTP method "
                "or a registered extension such as WebDAV's",
                headers={"Allow": ALLOW_HEADER_VALUE},
            )

        try:
            check_request_framing(request.headers, (request.version.major, request.version.minor))
        except FramingError as exc:
            return error_response(request, 400, "ambiguous_framing", str(exc))

        if request.path == HEALTH_PATH and request.method in ("GET", "HEAD"):
            return _text_response(200, "ok")

        if is_route_preflight(request.method, request.headers):
            return self._answer_preflight(request)

        route_parameters, other_parameters = split_route_parameter(request.rel_url.raw_query_string)
        if route_parameters:
            return _set_route_cookie(request, route_parameters, other_parameters)

        try:
            selected = select_route(request.headers)
        except InvalidRouteError as exc:
            return error_response(request, 400, "invalid_route", str(exc))

        if selected is None:
            return error_response(
                request,
                404,
                "missing_route",
                f"missing {ROUTE_HEADER} header: this endpoint routes requests by "
                f"{ROUTE_HEADER}: <user>:<service>, a baggage member ephemwork=<user>:<service> "
                "or the ephemwork cookie",
            )

        upgrades = upgrade_protocols(request.headers)
        websocket = upgrades == ["websocket"] and request.method == "GET"
        if upgrades and not websocket:
            return error_response(
                request,
                400,
                "upgrade_refused",
                f"Upgrade {', '.join(upgrades)!r} is not supported; only a GET with "
                "'Upgrade: websocket' is passed on",
            )

        session = self._routes.lookup(selected.route)
        if session is None:
            # The answer must not reveal whether the user has other routes, so it depends
            # only on the requested value.
            return error_response(
                request,
                404,
                "unknown_route",
                f"no laptop is registered for {str(selected.route)!r}",
            )

        structlog.contextvars.bind_contextvars(
            route=str(session.route), port=session.port, route_source=selected.source
        )
        if websocket:
            return await self._forward_websocket(request, session, selected)
        return await self._forward(request, session, selected)

    def _answer_preflight(self, request: web.Request) -> web.Response:
        origin = request.headers.get("Origin", "")
        if not self._cors.allows(origin):
            # Without CORS headers the browser blocks the request that would follow.
            return error_response(
                request,
                403,
                "origin_not_allowed",
                f"origin {origin!r} may not send {ROUTE_HEADER}; start the bastion with "
                "--cors-allow-origin for it",
            )

        logger.info(
            "proxy.preflight_answered",
            origin=origin,
            method=request.headers["Access-Control-Request-Method"],
            path=request.path,
        )
        return web.Response(status=204, headers=preflight_headers(request.headers))

    def _upstream_headers(self, request: web.Request, selected: SelectedRoute) -> CIMultiDict[str]:
        headers = forwarded_request_headers(
            request.headers, remote=request.remote, scheme=request.scheme, host=request.host
        )
        # A route chosen by baggage or cookie is passed on as the header too, so the service
        # forwards it whichever way the caller named it.
        headers.setdefault(ROUTE_HEADER, selected.route.header_value)
        return headers

    async def _forward(
        self, request: web.Request, session: Session, selected: SelectedRoute
    ) -> web.StreamResponse:
        route = str(session.route)
        client = request.app[CLIENT_SESSION_KEY]
        url = _tunnel_url(request, session.port)
        headers = self._upstream_headers(request, selected)

        try:
            upstream = await client.request(
                request.method,
                url,
                headers=headers,
                data=request.content if request.body_exists else None,
                allow_redirects=False,
            )
        except aiohttp.ClientConnectorError as exc:
            return _tunnel_not_connected(request, route, session.port, exc)
        except aiohttp.ClientResponseError as exc:
            # aiohttp's parser rejected the dev server's status line or headers.
            return _tunnel_down(request, exc, tunnel_malformed_message(route, exc.message))
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            return _tunnel_down(request, exc, tunnel_closed_message(route, session.port))
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            logger.warning("proxy.tunnel_timeout", error=repr(exc))
            return error_response(
                request,
                504,
                "tunnel_timeout",
                tunnel_timeout_message(route, self._timeouts.connect, self._timeouts.read),
            )

        async with upstream:
            bad_header = invalid_response_header(upstream.raw_headers)
            if bad_header is not None:
                return _tunnel_down(
                    request,
                    ValueError(f"invalid response header {bad_header}"),
                    tunnel_bad_header_message(route, bad_header),
                )

            headers = CIMultiDict(relayed_response_headers(upstream.headers))
            self._add_actual_cors_headers(request, headers)
            if _is_small_body(request.method, upstream):
                response = await self._relay_small(request, upstream, headers)
            else:
                response = await self._relay_stream(request, upstream, headers, b"")

        logger.info(
            "proxy.request_forwarded",
            method=request.method,
            path=request.path,
            status=upstream.status,
        )
        return response

    async def _relay_small(
        self, request: web.Request, upstream: aiohttp.ClientResponse, headers: CIMultiDict[str]
    ) -> web.StreamResponse:
        """Read a body of known, small size whole and send it with the headers in one write.

        aiohttp 3.14's StreamResponse sends its headers as soon as it is prepared, so a
        streamed response costs a send() for the headers and one per body chunk. A
        web.Response sends headers and body together. On loopback each send() also runs
        the receiver's TCP processing.
        """
        body = bytearray()
        try:
            async for chunk in upstream.content.iter_any():
                body += chunk
        except (aiohttp.ClientError, TimeoutError):
            # Relay what arrived and then break the connection, as the streamed path does,
            # so the caller sees a broken body rather than an answer of the bastion.
            return await self._relay_stream(request, upstream, headers, bytes(body))

        # The reason phrase comes from the status code: the dev server's own phrase is
        # not passed on, so it cannot carry text a client would misread.
        return web.Response(status=upstream.status, headers=headers, body=bytes(body))

    async def _relay_stream(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        headers: CIMultiDict[str],
        received: bytes,
    ) -> web.StreamResponse:
        """Relay the rest of the body chunk by chunk, after *received*, as it arrives."""
        response = web.StreamResponse(status=upstream.status, headers=headers)
        try:
            await response.prepare(request)
            if received:
                await response.write(received)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        except ConnectionResetError:
            # The caller went away; ConnectionResetError also covers aiohttp's
            # ClientConnectionResetError for writes to a closed transport.
            logger.debug("proxy.client_disconnected")
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The status line is already sent, so the only honest signal left is to
            # close the connection before the body's end.
            logger.warning("proxy.tunnel_failed_mid_body", error=repr(exc))
            if request.transport is not None:
                request.transport.abort()
        return response

    def _add_actual_cors_headers(self, request: web.Request, headers: CIMultiDict[str]) -> None:
        origin = request.headers.get("Origin")
        if origin is None or not self._cors.allows(origin):
            return
        if "Access-Control-Allow-Origin" not in headers:
            headers.extend(actual_response_headers(origin))
        headers.add("Vary", "Origin")

    async def _forward_websocket(
        self, request: web.Request, session: Session, selected: SelectedRoute
    ) -> web.StreamResponse:
        route = str(session.route)
        client = request.app[CLIENT_SESSION_KEY]
        headers = self._upstream_headers(request, selected)
        for name in _WEBSOCKET_HANDSHAKE_HEADERS:
            headers.popall(name, None)
        protocols = [
            token.strip()
            for value in request.headers.getall("Sec-WebSocket-Protocol", [])
            for token in value.split(",")
            if token.strip()
        ]

        handshake: list[aiohttp.ClientResponse] = []
        recording = _upgrade_responses.set(handshake)
        try:
            upstream = await client.ws_connect(
                _tunnel_url(request, session.port),
                headers=headers,
                protocols=protocols,
                autoping=False,
                autoclose=False,
                max_msg_size=MAX_MESSAGE_SIZE,
                timeout=aiohttp.ClientWSTimeout(ws_close=self._timeouts.connect),
            )
        except aiohttp.WSServerHandshakeError as exc:
            # The dev server did not switch protocols, so the caller's connection stays HTTP.
            status = exc.status if 400 <= exc.status < 500 else 502
            logger.info("proxy.websocket_refused", upstream_status=exc.status)
            return error_response(
                request,
                status,
                "websocket_refused",
                f"the dev server for {route!r} answered the WebSocket upgrade with "
                f"{exc.status} instead of 101",
            )
        except aiohttp.ClientConnectorError as exc:
            return _tunnel_not_connected(request, route, session.port, exc)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return _tunnel_down(
                request,
                exc,
                f"the laptop's tunnel for {route!r} failed during the WebSocket upgrade. "
                "Check that the dev server is running",
            )
        finally:
            _upgrade_responses.reset(recording)

        caller = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (),
            autoping=False,
            autoclose=False,
            max_msg_size=MAX_MESSAGE_SIZE,
        )
        if handshake:
            bad_header = invalid_response_header(handshake[0].raw_headers)
            if bad_header is not None:
                await upstream.close()
                return _tunnel_down(
                    request,
                    ValueError(f"invalid 101 header {bad_header}"),
                    f"the laptop's tunnel for {route!r} sent a 101 header {bad_header}. "
                    "Check the dev server's response headers",
                )
            for name, value in upgrade_response_headers(handshake[0].headers):
                caller.headers.add(name, value)
        self._add_actual_cors_headers(request, caller.headers)
        try:
            await caller.prepare(request)
            logger.info("proxy.websocket_opened", path=request.path)
            outcome = await relay_websocket(
                caller,
                upstream,
                idle_timeout=self._timeouts.websocket_idle,
                log_fields={"route": route},
            )
        finally:
            if not upstream.closed:
                await upstream.close()

        logger.info(
            "proxy.websocket_closed",
            closed_by=outcome.closed_by,
            close_code=outcome.close_code,
            messages_up=outcome.messages_up,
            messages_down=outcome.messages_down,
        )
        return caller


def _is_small_body(method: str, upstream: aiohttp.ClientResponse) -> bool:
    """Return whether the response has a body of known size up to `SMALL_BODY_MAX` bytes.

    HEAD, 1xx, 204 and 304 responses stay on the streamed path, because their
    Content-Length describes a body they do not carry.
    """
    length = upstream.content_length
    if length is None or length > SMALL_BODY_MAX or method == "HEAD":
        return False
    return upstream.status >= 200 and upstream.status not in (204, 304)


def _tunnel_url(request: web.Request, port: int) -> URL:
    return URL.build(
        scheme="http",
        host=TUNNEL_HOST,
        port=port,
        path=request.rel_url.raw_path,
        query_string=request.rel_url.raw_query_string,
        encoded=True,
    )


def _set_route_cookie(
    request: web.Request, values: list[str], other_parameters: str
) -> web.Response:
    value = values[-1].strip()
    if value:
        try:
            value = str(parse_route_value(value, source="?ephemwork="))
        except InvalidRouteError as exc:
            return error_response(request, 400, "invalid_route", str(exc))

    location = same_origin_location(request.rel_url.raw_path, other_parameters)
    secure = request.headers.get("X-Forwarded-Proto", request.scheme).lower() == "https"
    logger.info("proxy.route_cookie_set", cookie_route=value or None, path=request.path)
    # 307 repeats the request with its method and body, now carrying the cookie.
    return web.Response(
        status=307,
        headers={
            "Location": location,
            "Set-Cookie": route_cookie(value, secure=secure),
            "Cache-Control": "no-store",
            REQUEST_ID_HEADER: request_id_of(request),
        },
    )


def _tunnel_down(request: web.Request, exc: Exception, message: str) -> web.Response:
    logger.warning("proxy.tunnel_unavailable", error=repr(exc))
    return error_response(request, 502, "tunnel_unavailable", message)


def _tunnel_not_connected(
    request: web.Request, route: str, port: int, exc: Exception
) -> web.Response:
    return _tunnel_down(request, exc, tunnel_not_connected_message(route, port))


def _text_response(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/plain", charset="utf-8")
