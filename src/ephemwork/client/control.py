"""The client of the bastion's control API, spoken as HTTP/1.1 over the SSH connection.

The control API listens on the bastion's loopback only. Each call opens a direct-tcpip
channel (``conn.open_connection``) to it, sends one request with ``Connection: close`` and
reads the response to EOF, so no HTTP connection state outlives a call.
"""

from __future__ import annotations

import asyncio
from typing import NamedTuple, TypeVar
from urllib.parse import quote

import asyncssh
import structlog
from multidict import CIMultiDict

from ephemwork.errors import ControlAPIError, ProtocolMismatchError, TunnelError
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

log = structlog.get_logger()

T = TypeVar("T")

# Seconds a whole call (channel open, request, response) may take.
DEFAULT_TIMEOUT = 10.0

# Control API bodies are a few kilobytes; the cap keeps a misbehaving peer from filling memory.
MAX_RESPONSE_BYTES = 8 * 1024 * 1024

_READ_CHUNK = 64 * 1024


class HttpResponse(NamedTuple):
    """A complete HTTP response: status code, headers and the decoded body."""

    status: int
    headers: CIMultiDict[str]
    body: bytes


class _MalformedResponse(Exception):
    """The bytes read from the channel are not a valid HTTP/1.1 response."""


async def http_request(
    conn: asyncssh.SSHClientConnection,
    host: str,
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    *,
    call_timeout: float = DEFAULT_TIMEOUT,
) -> HttpResponse:
    """Send one HTTP/1.1 request to *host*:*port* as seen from the SSH server, and read the reply.

    ``Host``, ``Content-Length`` and ``Connection: close`` are always set. Raises `TunnelError`
    when the channel cannot be opened, breaks or times out, and `ControlAPIError` with code
    ``invalid_response`` when the reply is not valid HTTP.
    """
    request = _format_request(host, port, method, path, headers or {}, body)
    target = f"{method} {path} to {host}:{port}"

    try:
        async with asyncio.timeout(call_timeout):
            raw = await _exchange(conn, host, port, request)
    except TimeoutError:
        raise TunnelError(
            f"{target} through the SSH connection timed out after {call_timeout:g}s. Check that "
            "the bastion's ephemwork server is running, then retry."
        ) from None

    try:
        response = _parse_response(raw)
    except _MalformedResponse as exc:
        raise ControlAPIError(
            f"{target} returned a malformed HTTP response: {exc}. Check that the port belongs "
            "to the ephemwork server on the bastion.",
            code="invalid_response",
        ) from None

    log.debug("http.response", method=method, path=path, port=port, status=response.status)
    return response


async def _exchange(
    conn: asyncssh.SSHClientConnection, host: str, port: int, request: bytes
) -> bytes:
    try:
        reader, writer = await conn.open_connection(host, port)
    except asyncssh.ChannelOpenError as exc:
        raise TunnelError(
            f"The bastion cannot open a connection to {host}:{port}: {exc.reason}. Check that "
            "its ephemwork server is running and that the configured port matches it."
        ) from exc
    except (asyncssh.Error, OSError) as exc:
        raise TunnelError(
            f"The SSH connection to the bastion failed while opening a channel to "
            f"{host}:{port}: {exc}. Run the command again to reconnect."
        ) from exc

    try:
        writer.write(request)
        return await _read_to_eof(reader)
    except (asyncssh.Error, OSError) as exc:
        raise TunnelError(
            f"The channel to {host}:{port} on the bastion broke during a request: {exc}. "
            "Run the command again to reconnect."
        ) from exc
    finally:
        writer.close()


async def _read_to_eof(reader: asyncssh.SSHReader[bytes]) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await reader.read(_READ_CHUNK)
        if not chunk:
            return b"".join(chunks)

        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise TunnelError(
                f"The response is larger than {MAX_RESPONSE_BYTES} bytes, which no control "
                "API call returns. Check that the port belongs to the ephemwork server."
            )
        chunks.append(chunk)


def _format_request(
    host: str, port: int, method: str, path: str, headers: dict[str, str], body: bytes
) -> bytes:
    fields = {
        "Host": f"{host}:{port}",
        **headers,
        "Content-Length": str(len(body)),
        "Connection": "close",
    }
    lines = [f"{method} {path} HTTP/1.1"]
    for name, value in fields.items():
        # A CR or LF in a header would let a value start a header or request of its own.
        if any(char in name + value for char in "\r\n"):
            raise ValueError(f"HTTP header {name!r} contains a line break: {value!r}")
        lines.append(f"{name}: {value}")

    head = "\r\n".join(lines) + "\r\n\r\n"
    return head.encode("latin-1") + body


def _parse_response(raw: bytes) -> HttpResponse:
    head, separator, rest = raw.partition(b"\r\n\r\n")
    if not separator:
        raise _MalformedResponse(f"no end of headers in {len(raw)} bytes: {raw[:80]!r}")

    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise _MalformedResponse(f"invalid status line {status_line!r}")
    status = int(parts[1])

    headers: CIMultiDict[str] = CIMultiDict()
    for line in header_lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise _MalformedResponse(f"invalid header line {line!r}")
        headers.add(name, value.strip())

    return HttpResponse(status, headers, _decode_body(headers, rest))


def _decode_body(headers: CIMultiDict[str], rest: bytes) -> bytes:
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        return _decode_chunked(rest)

    length_value = headers.get("Content-Length")
    if length_value is None:
        return rest
    if not length_value.isdigit():
        raise _MalformedResponse(f"invalid Content-Length {length_value!r}")

    length = int(length_value)
    if len(rest) < length:
        raise _MalformedResponse(f"body ended after {len(rest)} of {length} bytes")
    return rest[:length]


def _decode_chunked(data: bytes) -> bytes:
    body = bytearray()
    position = 0
    while True:
        line_end = data.find(b"\r\n", position)
        if line_end < 0:
            raise _MalformedResponse("chunked body ended inside a chunk size line")

        size_field = data[position:line_end].split(b";", 1)[0].strip()
        try:
            size = int(size_field, 16)
        except ValueError:
            raise _MalformedResponse(f"invalid chunk size {size_field!r}") from None

        if size == 0:
            return bytes(body)

        start = line_end + 2
        if len(data) < start + size + 2:
            raise _MalformedResponse("chunked body ended inside a chunk")
        body += data[start : start + size]
        position = start + size + 2


class ControlClient:
    """Calls of the bastion's control API through one SSH connection."""

    _conn: asyncssh.SSHClientConnection
    _port: int
    _timeout: float

    def __init__(
        self,
        conn: asyncssh.SSHClientConnection,
        control_port: int,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._conn = conn
        self._port = control_port
        self._timeout = timeout

    @property
    def control_port(self) -> int:
        """The control API's port on the bastion's loopback."""
        return self._port

    async def register(self, request: RegisterRequest) -> RegisterResponse:
        """Register a session for ``request.user:request.service`` and return it with its lease."""
        path = f"{CONTROL_API_PREFIX}/sessions"
        response = await self._call("POST", path, body=encode(request), expected=201)
        return self._decode(response, RegisterResponse, "POST", path)

    async def renew(self, session_id: str) -> LeaseRenewal:
        """Extend the lease of *session_id*; raises `ControlAPIError` ``session_not_found``."""
        path = f"{CONTROL_API_PREFIX}/sessions/{quote(session_id, safe='')}/renew"
        response = await self._call("POST", path, expected=200)
        return self._decode(response, LeaseRenewal, "POST", path)

    async def deregister(self, session_id: str) -> None:
        """Delete *session_id*; raises `ControlAPIError` ``session_not_found``."""
        path = f"{CONTROL_API_PREFIX}/sessions/{quote(session_id, safe='')}"
        await self._call("DELETE", path, expected=204)

    async def list_sessions(self, user: str | None = None) -> SessionList:
        """Return the bastion's sessions, only those of *user* when it is given."""
        path = f"{CONTROL_API_PREFIX}/sessions"
        if user is not None:
            path += f"?user={quote(user, safe='')}"
        response = await self._call("GET", path, expected=200)
        return self._decode(response, SessionList, "GET", path)

    async def _call(
        self, method: str, path: str, *, expected: int, body: bytes = b""
    ) -> HttpResponse:
        headers = {PROTOCOL_HEADER: str(PROTOCOL_VERSION), "Accept": "application/json"}
        if body:
            headers["Content-Type"] = "application/json"

        response = await http_request(
            self._conn,
            "127.0.0.1",
            self._port,
            method,
            path,
            headers,
            body,
            call_timeout=self._timeout,
        )

        problem = check_protocol(response.headers.get(PROTOCOL_HEADER), peer="bastion")
        if problem is not None:
            raise ProtocolMismatchError(problem, code="protocol_mismatch", status=response.status)

        if response.status != expected:
            raise _error_from_response(response, method, path)

        return response

    @staticmethod
    def _decode(response: HttpResponse, message_type: type[T], method: str, path: str) -> T:
        try:
            return decode(response.body, message_type)
        except WireFormatError as exc:
            raise ControlAPIError(
                f"The bastion's reply to {method} {path} is not a valid "
                f"{message_type.__name__}: {exc}. Install the same ephemwork release on the "
                "laptop and the bastion.",
                code="invalid_response",
                status=response.status,
            ) from None


def _error_from_response(response: HttpResponse, method: str, path: str) -> ControlAPIError:
    try:
        error = decode(response.body, ErrorBody)
    except WireFormatError:
        return ControlAPIError(
            f"The bastion returned HTTP {response.status} to {method} {path} without a valid "
            f"error body: {response.body[:200]!r}. Check the bastion's log.",
            code="invalid_response",
            status=response.status,
        )

    message = f"The bastion rejected {method} {path}: {error.message}"
    if error.code == "protocol_mismatch":
        return ProtocolMismatchError(message, code=error.code, status=response.status)
    return ControlAPIError(message, code=error.code, status=response.status)
