"""The routing proxy: ``X-Ephemwork: <user>:<service>`` selects a tunnel port on loopback.

Each request is looked up in the in-memory registry and streamed to
``http://127.0.0.1:<port>``, the bastion end of the laptop's reverse SSH forward. Bodies
are relayed chunk by chunk in both directions with no buffering of a whole body, and
``await response.write`` waits for the client to drain before the next chunk is read.

Responses that the proxy generates itself are plain text:

- ``GET /ephemwork-health``: 200 ``ok`` for the load balancer's health check;
- a malformed header: 400 with the reason;
- no header, or a route no laptop registered: 404 naming the value;
- a registered route whose tunnel port refuses or drops the connection: 502;
- a tunnel that does not respond within the connect or read timeout: 504.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from typing import Protocol

import aiohttp
import attrs
import structlog
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ephemwork.bastion.routing import InvalidRouteError, route_from_header_values
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

# aiohttp sends "100 Continue" itself before the handler reads the body, so the tunnel
# must not wait for a second interim response.
_DROPPED_REQUEST_HEADERS = frozenset({"host", "expect"})

TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"

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


CLIENT_SESSION_KEY = web.AppKey("proxy_client_session", aiohttp.ClientSession)


def create_proxy_app(
    routes: RouteTable, *, timeouts: ProxyTimeouts = ProxyTimeouts()
) -> web.Application:
    """Build the proxy application; one shared client session is opened on startup."""
    app = web.Application()
    app.cleanup_ctx.append(_client_session_context(timeouts))
    app.router.add_route("*", "/{tail:.*}", _ProxyHandler(routes, timeouts).handle)
    return app


def hop_by_hop_names(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    """Return the lower-case names of the hop-by-hop headers of one message.

    They are the fixed set plus every name listed in the message's Connection headers.
    """
    listed = {
        token.strip().lower()
        for value in headers.getall("Connection", [])
        for token in value.split(",")
        if token.strip()
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
    dropped = hop_by_hop_names(headers) | _DROPPED_REQUEST_HEADERS
    forwarded: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() in dropped or name.lower() == "x-forwarded-for":
            continue
        forwarded.add(name, value)

    chain = [value.strip() for value in headers.getall("X-Forwarded-For", []) if value.strip()]
    if remote:
        chain.append(remote)
    if chain:
        forwarded["X-Forwarded-For"] = ", ".join(chain)

    forwarded.setdefault("X-Forwarded-Proto", scheme)
    forwarded["X-Forwarded-Host"] = host
    return forwarded


def relayed_response_headers(headers: CIMultiDictProxy[str]) -> Iterable[tuple[str, str]]:
    """Yield the tunnel's response headers minus hop-by-hop ones, repeats kept in order."""
    dropped = hop_by_hop_names(headers)
    for name, value in headers.items():
        if name.lower() not in dropped:
            yield name, value


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
        session = aiohttp.ClientSession(
            connector=connector,
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

    def __init__(self, routes: RouteTable, timeouts: ProxyTimeouts) -> None:
        self._routes = routes
        self._timeouts = timeouts

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == HEALTH_PATH and request.method in ("GET", "HEAD"):
            return _text_response(200, "ok")

        try:
            route = route_from_header_values(request.headers.getall(ROUTE_HEADER, []))
        except InvalidRouteError as exc:
            logger.debug("proxy.invalid_route", error=str(exc), remote=request.remote)
            return _text_response(400, f"{exc}\n")

        if route is None:
            return _text_response(
                404,
                f"missing {ROUTE_HEADER} header: this endpoint routes requests by "
                f"{ROUTE_HEADER}: <user>:<service>\n",
            )

        session = self._routes.lookup(route)
        if session is None:
            logger.debug("proxy.unknown_route", route=str(route), remote=request.remote)
            return _text_response(404, f"no laptop is registered for {str(route)!r}\n")

        return await self._forward(request, session)

    async def _forward(self, request: web.Request, session: Session) -> web.StreamResponse:
        route = str(session.route)
        client = request.app[CLIENT_SESSION_KEY]
        url = URL.build(
            scheme="http",
            host=TUNNEL_HOST,
            port=session.port,
            path=request.rel_url.raw_path,
            query_string=request.rel_url.raw_query_string,
            encoded=True,
        )
        headers = forwarded_request_headers(
            request.headers, remote=request.remote, scheme=request.scheme, host=request.host
        )

        try:
            upstream = await client.request(
                request.method,
                url,
                headers=headers,
                data=request.content if request.body_exists else None,
                allow_redirects=False,
            )
        except aiohttp.ClientConnectorError as exc:
            return _tunnel_down(
                route,
                session.port,
                exc,
                f"is not connected: nothing listens on bastion port {session.port}. "
                "Check that `ephemwork up` is still running on the laptop",
            )
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            # The SSH server accepts on the tunnel port and then closes the socket when the
            # laptop cannot reach its dev server, so this usually means the dev server is down.
            return _tunnel_down(
                route,
                session.port,
                exc,
                f"closed the connection without a response (bastion port {session.port}). "
                "Check that the dev server on the laptop is running",
            )
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            logger.warning("proxy.tunnel_timeout", route=route, port=session.port, error=repr(exc))
            return _text_response(
                504,
                f"the laptop's tunnel for {route!r} timed out (connect timeout "
                f"{self._timeouts.connect} s, read timeout {self._timeouts.read} s)\n",
            )

        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in relayed_response_headers(upstream.headers):
                response.headers.add(name, value)

            try:
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            except ConnectionResetError:
                # The caller went away; ConnectionResetError also covers aiohttp's
                # ClientConnectionResetError for writes to a closed transport.
                logger.debug("proxy.client_disconnected", route=route, port=session.port)
            except (aiohttp.ClientError, TimeoutError) as exc:
                # The status line is already sent, so the only honest signal left is to
                # close the connection before the body's end.
                logger.warning(
                    "proxy.tunnel_failed_mid_body",
                    route=route,
                    port=session.port,
                    error=repr(exc),
                )
                if request.transport is not None:
                    request.transport.abort()

        logger.info(
            "proxy.request_forwarded",
            route=route,
            port=session.port,
            method=request.method,
            path=request.path,
            status=upstream.status,
        )
        return response


def _tunnel_down(route: str, port: int, exc: Exception, problem: str) -> web.Response:
    logger.warning("proxy.tunnel_unavailable", route=route, port=port, error=repr(exc))
    return _text_response(502, f"the laptop's tunnel for {route!r} {problem}\n")


def _text_response(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/plain", charset="utf-8")
