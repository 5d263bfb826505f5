"""The bastion's view of a user's sessions, and a probe request through each live route.

``ephemwork status`` must not report a route as connected only because the bastion still
keeps its session: the reverse forward or the laptop's end of it may be broken. So for each
session it sends one request through the bastion's proxy, over its own SSH connection (a
direct-tcpip channel to the proxy port on the bastion's loopback), with the session's
``X-Ephemwork`` header, and checks whether the answer came back from the laptop.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import asyncssh
import attrs
import structlog

from ephemwork.client.control import ControlClient, HttpResponse, http_request
from ephemwork.client.endpoint import target_of
from ephemwork.client.forwarding import DEV_SERVER_DOWN_MESSAGE
from ephemwork.client.state import BastionEndpoint
from ephemwork.client.tunnel import connect
from ephemwork.errors import ControlAPIError, TunnelError
from ephemwork.wire import ROUTE_HEADER, Session

log = structlog.get_logger()

# Seconds a probe request may take. A dev server that needs longer counts as unreachable.
PROBE_TIMEOUT = 5.0

PROBE_PATH = "/"

# Error responses that the bastion's proxy generates itself contain these JSON fields when
# the request accepts JSON. Older bastions send a plain-text 502 with this phrase instead.
_BASTION_ERROR_FIELDS = frozenset({"status", "error", "message", "request_id"})
_OLD_BASTION_TUNNEL_PHRASE = b"the laptop's tunnel for"


@attrs.frozen
class ProbeResult:
    """The outcome of one request through the bastion's proxy to a route."""

    # Whether the response came back through the reverse forward, from the dev server or from
    # the laptop's `up` standing in for a stopped dev server.
    from_laptop: bool
    # Whether the dev server itself answered.
    dev_server_up: bool
    # The HTTP status, or None when no answer arrived.
    status: int | None
    detail: str


@attrs.frozen
class BastionView:
    """The sessions of one user as one bastion reported them, with probe results."""

    reachable: bool
    # The error that kept the bastion from replying, or "" when it replied.
    error: str
    sessions: list[Session]
    # Probe results by route header value; the bastion lists sessions without their ids.
    probes: dict[str, ProbeResult]


async def inspect_bastion(
    endpoint: BastionEndpoint, user: str, probe_routes: Sequence[str]
) -> BastionView:
    """List *user*'s sessions on the bastion, and probe each route of *probe_routes* it holds.

    *probe_routes* are ``X-Ephemwork`` header values such as ``alice:api``.
    """
    target = target_of(endpoint)
    try:
        conn = await connect(target)
    except TunnelError as exc:
        log.info("status.bastion_unreachable", target=target.description, error=str(exc))
        return BastionView(reachable=False, error=str(exc), sessions=[], probes={})

    try:
        try:
            listing = await ControlClient(conn, endpoint.control_port).list_sessions(user)
        except (TunnelError, ControlAPIError) as exc:
            log.info("status.list_failed", target=target.description, error=str(exc))
            return BastionView(reachable=False, error=str(exc), sessions=[], probes={})

        probes = {}
        for session in listing.sessions:
            route = session.route.header_value
            if route in probe_routes:
                probes[route] = await probe_route(conn, endpoint.proxy_port, route)
        return BastionView(reachable=True, error="", sessions=listing.sessions, probes=probes)
    finally:
        conn.close()
        try:
            await conn.wait_closed()
        except (asyncssh.Error, OSError) as exc:
            log.info("status.close_failed", target=target.description, error=str(exc))


async def probe_route(
    conn: asyncssh.SSHClientConnection, proxy_port: int, header_value: str
) -> ProbeResult:
    """Send ``GET /`` with *header_value* to the proxy on the bastion's loopback and classify it."""
    headers = {ROUTE_HEADER: header_value, "Accept": "application/json", "User-Agent": "ephemwork"}
    try:
        response = await http_request(
            conn,
            "127.0.0.1",
            proxy_port,
            "GET",
            PROBE_PATH,
            headers,
            call_timeout=PROBE_TIMEOUT,
        )
    except (TunnelError, ControlAPIError) as exc:
        log.info("status.probe_failed", route=header_value, error=str(exc))
        return ProbeResult(from_laptop=False, dev_server_up=False, status=None, detail=str(exc))

    result = classify_probe(response)
    log.info(
        "status.probed",
        route=header_value,
        status=response.status,
        from_laptop=result.from_laptop,
    )
    return result


def classify_probe(response: HttpResponse) -> ProbeResult:
    """Tell an answer of the laptop from one the bastion's proxy made up itself."""
    bastion_message = _bastion_error_message(response)
    if bastion_message is not None:
        return ProbeResult(
            from_laptop=False,
            dev_server_up=False,
            status=response.status,
            detail=f"the bastion answered {response.status}: {bastion_message}",
        )

    text = response.body.decode(errors="replace").strip()
    if response.status == 502 and text.startswith(DEV_SERVER_DOWN_MESSAGE):
        return ProbeResult(
            from_laptop=True, dev_server_up=False, status=response.status, detail=text
        )
    return ProbeResult(
        from_laptop=True,
        dev_server_up=True,
        status=response.status,
        detail=f"the dev server answered {response.status}",
    )


def _bastion_error_message(response: HttpResponse) -> str | None:
    # NOTE: a dev server that returns exactly the bastion's JSON error shape, or a 502 with
    # the old bastion's phrase, is taken for the bastion, because no header marks the source.
    if response.status == 502 and _OLD_BASTION_TUNNEL_PHRASE in response.body:
        return response.body.decode(errors="replace").strip()
    try:
        document = json.loads(response.body)
    except ValueError:
        return None
    if not isinstance(document, dict) or set(document) != _BASTION_ERROR_FIELDS:
        return None
    return str(document["message"])
