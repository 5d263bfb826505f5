"""The control API: register, renew, deregister and list sessions, as JSON over HTTP.

It listens on the bastion's loopback, so a laptop reaches it only through its SSH
connection. Every request must carry the protocol header and every response, errors
included, carries this side's protocol version.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import attrs
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from ephemwork.bastion.ports import PortsExhaustedError
from ephemwork.bastion.registry import (
    InvalidSessionRequestError,
    RegistryError,
    RouteTakenError,
    SessionNotFoundError,
    SessionRegistry,
)
from ephemwork.identity import NAME_RULE, is_valid_name
from ephemwork.wire import (
    CONTROL_API_PREFIX,
    PROTOCOL_HEADER,
    PROTOCOL_VERSION,
    ErrorBody,
    LeaseRenewal,
    RegisterRequest,
    RegisterResponse,
    SessionList,
    WireFormatError,
    check_protocol,
    decode,
    encode,
)

Clock = Callable[[], float]

REGISTRY_KEY = web.AppKey("registry", SessionRegistry)
CLOCK_KEY: web.AppKey[Clock] = web.AppKey("clock")

JSON_CONTENT_TYPE = "application/json"

# Statuses for errors that aiohttp raises itself, before a handler of ours runs.
_HTTP_ERROR_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
}

logger = structlog.get_logger()


def create_control_app(registry: SessionRegistry, *, clock: Clock = time.time) -> web.Application:
    """Build the control API application around *registry*; *clock* returns Unix seconds."""
    app = web.Application(middlewares=[_protocol_middleware])
    app[REGISTRY_KEY] = registry
    app[CLOCK_KEY] = clock
    app.on_response_prepare.append(_add_protocol_header)

    sessions = f"{CONTROL_API_PREFIX}/sessions"
    app.router.add_post(sessions, _register)
    app.router.add_get(sessions, _list_sessions)
    app.router.add_post(sessions + "/{session_id}/renew", _renew)
    app.router.add_delete(sessions + "/{session_id}", _deregister)
    return app


def error_response(status: int, code: str, message: str) -> web.Response:
    """Return a JSON `ErrorBody` response."""
    return web.Response(
        status=status,
        body=encode(ErrorBody(code=code, message=message)),
        content_type=JSON_CONTENT_TYPE,
    )


def _json_response(message: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=encode(message), content_type=JSON_CONTENT_TYPE)


def _status_for(error: RegistryError | PortsExhaustedError) -> int:
    if isinstance(error, InvalidSessionRequestError):
        return 400
    if isinstance(error, SessionNotFoundError):
        return 404
    if isinstance(error, RouteTakenError):
        return 409
    if isinstance(error, PortsExhaustedError):
        return 503
    return 500


def _registry_error_response(error: RegistryError | PortsExhaustedError) -> web.Response:
    return error_response(_status_for(error), error.code, str(error))


async def _add_protocol_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[PROTOCOL_HEADER] = str(PROTOCOL_VERSION)


@web.middleware
async def _protocol_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    problem = check_protocol(request.headers.get(PROTOCOL_HEADER), peer="laptop")
    if problem is not None:
        logger.warning(
            "control.protocol_mismatch",
            method=request.method,
            path=request.path,
            received=request.headers.get(PROTOCOL_HEADER),
        )
        return error_response(400, "protocol_mismatch", problem)

    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_ERROR_CODES.get(exc.status, f"http_{exc.status}")
        message = f"{request.method} {request.path}: {exc.reason}."
        return error_response(exc.status, code, message)


async def _register(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY_KEY]

    try:
        register_request = decode(await request.read(), RegisterRequest)
    except WireFormatError as exc:
        logger.warning("control.register_rejected", code="invalid_request", error=str(exc))
        return error_response(400, "invalid_request", f"Invalid register request: {exc}.")

    route = f"{register_request.user}:{register_request.service}"
    try:
        session = registry.register(register_request, request.app[CLOCK_KEY]())
    except (RegistryError, PortsExhaustedError) as exc:
        logger.warning(
            "control.register_rejected",
            code=exc.code,
            route=route,
            client=register_request.client,
            error=str(exc),
        )
        return _registry_error_response(exc)

    logger.info(
        "control.session_registered",
        session_id=session.session_id,
        route=route,
        port=session.port,
        client=session.client,
        takeover=register_request.takeover,
    )
    return _json_response(RegisterResponse(session=session, lease_ttl=registry.lease_ttl), 201)


async def _renew(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY_KEY]
    session_id = request.match_info["session_id"]

    try:
        session = registry.renew(session_id, request.app[CLOCK_KEY]())
    except RegistryError as exc:
        logger.warning("control.renew_failed", session_id=session_id, code=exc.code)
        return _registry_error_response(exc)

    # Renewals arrive every few seconds per session, so they stay at debug level.
    logger.debug(
        "control.session_renewed",
        session_id=session_id,
        route=str(session.route),
        port=session.port,
        lease_expires_at=session.lease_expires_at,
    )
    return _json_response(
        LeaseRenewal(
            session_id=session_id,
            lease_expires_at=session.lease_expires_at,
            lease_ttl=registry.lease_ttl,
        )
    )


async def _deregister(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY_KEY]
    session_id = request.match_info["session_id"]

    try:
        session = registry.deregister(session_id)
    except RegistryError as exc:
        logger.warning("control.deregister_failed", session_id=session_id, code=exc.code)
        return _registry_error_response(exc)

    logger.info(
        "control.session_deregistered",
        session_id=session_id,
        route=str(session.route),
        port=session.port,
        client=session.client,
    )
    return web.Response(status=204)


async def _list_sessions(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY_KEY]
    user = request.query.get("user")

    if user is not None and not is_valid_name(user):
        return error_response(
            400, "invalid_request", f"Invalid user name {user!r} in ?user=: use {NAME_RULE}."
        )

    # Any laptop with a tunnel may list, and the session id is the secret that renews,
    # deregisters and takes over a session, so the listing leaves it empty.
    sessions = [attrs.evolve(session, session_id="") for session in registry.list(user)]
    return _json_response(SessionList(sessions=sessions))
