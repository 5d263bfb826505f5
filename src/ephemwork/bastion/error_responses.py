"""Error responses of the proxy: short plain text for curl, JSON for callers that accept it.

Every answer the proxy generates itself carries a request id in the ``X-Request-Id``
header and in its body, and the same id appears in the bastion's log line for the request,
so a developer can quote the id and an operator can find the line.
"""

from __future__ import annotations

import itertools
import json
import secrets
from collections.abc import Mapping
from http import HTTPStatus

import structlog
from aiohttp import web

REQUEST_ID_HEADER = "X-Request-Id"

# The key under which the proxy stores the request id on an aiohttp request.
REQUEST_ID_KEY = web.RequestKey("ephemwork_request_id", str)

# Error statuses after which the connection is closed.
_CLOSING_STATUSES = frozenset({400, 405, 408, 413, 431, 501})

# Random per process, so ids from two runs of the bastion do not collide in one log.
_ID_PREFIX = secrets.token_hex(4)
_id_counter = itertools.count(secrets.randbelow(1 << 32))

logger = structlog.get_logger()


def new_request_id() -> str:
    """Return a fresh request id: 16 hex digits, unique within this process.

    The id only links a response to its log line, so it needs no secrecy, and a counter
    behind a random prefix avoids a getrandom() call per request.
    """
    return f"{_ID_PREFIX}{next(_id_counter) & 0xFFFFFFFF:08x}"


def request_id_of(request: web.BaseRequest) -> str:
    """Return the request id of *request*, assigning one on first use."""
    request_id = request.get(REQUEST_ID_KEY)
    if request_id is None:
        request_id = new_request_id()
        request[REQUEST_ID_KEY] = request_id
    return request_id


def accepts_json(accept: str) -> bool:
    """Return whether an Accept header value lists a JSON media type with a non-zero q."""
    for item in accept.split(","):
        media_type, *parameters = (part.strip() for part in item.split(";"))
        media_type = media_type.lower()
        if media_type != "application/json" and not media_type.endswith("+json"):
            continue
        weights = [p.partition("=")[2] for p in parameters if p.lower().startswith("q=")]
        try:
            if weights and float(weights[0]) <= 0:
                continue
        except ValueError:
            continue
        return True
    return False


def error_body(
    status: int, code: str, message: str, request_id: str, *, as_json: bool
) -> tuple[bytes, str]:
    """Return the body and content type of an error answer."""
    if as_json:
        document = {"status": status, "error": code, "message": message, "request_id": request_id}
        return json.dumps(document).encode() + b"\n", "application/json"
    text = f"{message} (request id {request_id})\n"
    return text.encode(), "text/plain; charset=utf-8"


def error_response(
    request: web.BaseRequest,
    status: int,
    code: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    remote: str | None = None,
) -> web.Response:
    """Build an error answer for *request* and log it with the request id.

    *message* is one line, without the status, that names the value at fault and the fix.
    """
    request_id = request_id_of(request)
    as_json = accepts_json(request.headers.get("Accept", ""))
    body, content_type = error_body(status, code, message, request_id, as_json=as_json)

    logger.info(
        "proxy.request_rejected",
        request_id=request_id,
        status=status,
        code=code,
        reason=message,
        method=request.method,
        path=request.path,
        remote=remote if remote is not None else request.remote,
    )

    response = web.Response(status=status, body=body, headers=headers)
    response.headers["Content-Type"] = content_type
    response.headers[REQUEST_ID_HEADER] = request_id
    if status in _CLOSING_STATUSES:
        # The request's body or framing cannot be trusted, so the next bytes on this
        # connection could be read as a request nobody sent.
        response.force_close()
    return response


def raw_error_response(
    status: int,
    code: str,
    message: str,
    request_id: str,
    *,
    as_json: bool = False,
    close: bool = True,
) -> bytes:
    """Return a whole HTTP/1.1 error response, which closes the connection unless *close* is False.

    Used where no aiohttp request exists: a connection that exceeded the per-client cap or
    sent no complete headers in time, and the relay's error responses for plain requests.
    """
    body, content_type = error_body(status, code, message, request_id, as_json=as_json)
    connection = "Connection: close\r\n" if close else ""
    head = (
        f"HTTP/1.1 {status} {_phrase(status)}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{REQUEST_ID_HEADER}: {request_id}\r\n"
        f"{connection}\r\n"
    )
    return head.encode("ascii") + body


def tunnel_not_connected_message(route: str, port: int) -> str:
    """Return the 502 message for a tunnel port where nothing listens."""
    return (
        f"the laptop's tunnel for {route!r} is not connected: nothing listens on bastion port "
        f"{port}. Check that `ephemwork up` is still running on the laptop"
    )


def tunnel_closed_message(route: str, port: int) -> str:
    """Return the 502 message for a tunnel port that closed without a response.

    The SSH server accepts on the tunnel port and then closes the socket when the laptop
    cannot reach its dev server, so this usually means the dev server is down.
    """
    return (
        f"the laptop's tunnel for {route!r} closed the connection without a response "
        f"(bastion port {port}). Check that the dev server on the laptop is running"
    )


def tunnel_malformed_message(route: str, problem: str) -> str:
    """Return the 502 message for an unparseable response, with the parser's *problem*."""
    return (
        f"the laptop's tunnel for {route!r} sent a malformed response "
        f"({problem.splitlines()[0] if problem else 'unknown error'}). "
        "Check the dev server's response headers"
    )


def tunnel_bad_header_message(route: str, header: str) -> str:
    """Return the 502 message for a response header that cannot be relayed unchanged."""
    return (
        f"the laptop's tunnel for {route!r} sent a response header {header}. "
        "Check the dev server's headers"
    )


def tunnel_timeout_message(route: str, connect: float, read: float | None) -> str:
    """Return the 504 message for a tunnel that sent no response in time."""
    return (
        f"the laptop's tunnel for {route!r} timed out (connect timeout {connect} s, "
        f"read timeout {read} s)"
    )


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
