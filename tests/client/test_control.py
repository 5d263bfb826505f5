"""Tests of the control API client over a real SSH connection to the test double."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncssh
import pytest

from ephemwork.client.control import ControlClient, http_request
from ephemwork.errors import ControlAPIError, ProtocolMismatchError, TunnelError
from ephemwork.wire import PROTOCOL_HEADER, PROTOCOL_VERSION, RegisterRequest

from .conftest import FakeControlAPI, free_port


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[bytes | None], Awaitable[int]]]:
    """Return a starter of TCP servers that send fixed bytes, or nothing if given None."""
    servers: list[asyncio.Server] = []
    writers: list[asyncio.StreamWriter] = []

    async def start(reply: bytes | None) -> int:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
            await reader.readuntil(b"\r\n\r\n")
            if reply is None:
                await asyncio.sleep(30)
            else:
                writer.write(reply)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    yield start

    # Python 3.11's Server.close() leaves accepted connections open.
    for writer in writers:
        writer.close()
    for server in servers:
        server.close()
        await server.wait_closed()


def _request(user: str = "alice", service: str = "api", takeover: bool = False) -> RegisterRequest:
    return RegisterRequest(user=user, service=service, client="test", takeover=takeover)


class TestRegister:
    async def test_returns_session(
        self, ssh_conn: asyncssh.SSHClientConnection, control_api: FakeControlAPI
    ) -> None:
        """A registration returns the session the bastion created, with its lease."""
        control_api.lease_ttl = 12.0
        client = ControlClient(ssh_conn, control_api.port)

        response = await client.register(_request())

        assert response.session.session_id in control_api.sessions
        assert response.session.route.header_value == "alice:api"
        assert response.lease_ttl == 12.0

    async def test_sends_protocol_header(
        self, ssh_conn: asyncssh.SSHClientConnection, control_api: FakeControlAPI
    ) -> None:
        """Every request carries the client's protocol version."""
        client = ControlClient(ssh_conn, control_api.port)

        await client.register(_request())

        assert control_api.request_protocols == [str(PROTOCOL_VERSION)]

    async def test_route_taken(
        self, ssh_conn: asyncssh.SSHClientConnection, control_api: FakeControlAPI
    ) -> None:
        """A 409 becomes a ControlAPIError with code route_taken and the bastion's sentence."""
        control_api.add_foreign_session("alice", "api")
        client = ControlClient(ssh_conn, control_api.port)

        with pytest.raises(ControlAPIError) as caught:
            await client.register(_request())

        assert caught.value.code == "route_taken"
        assert caught.value.status == 409
        assert "alice:api is taken" in str(caught.value)


class TestRenew:
    async def test_extends_lease(
        self, ssh_conn: asyncssh.SSHClientConnection, control_api: FakeControlAPI
    ) -> None:
        """A renewal returns the session's id and new expiry."""
        client = ControlClient(ssh_conn, control_api.port)
        session = (await client.register(_request())).session

        renewal = await client.renew(session.session_id)

        assert renewal.session_id == session.session_id
        assert control_api.renewals == [session.session_id]

    async def test_unknown_session(
        self, ssh_conn: asyncssh.SSHClientConnection, control_api: FakeControlAPI
    ) -> None:
        """Renewing an unknown session raises session_not_found with status 404."""
        client = ControlClient(ssh_conn, control_api.port)

        with pytest.raises(ControlAPIError) as caught:
            await client.renew("no-such-session")

        assert caught.value.code == "session_not_found"
        assert caught.value.status == 404


class TestDeregister:
    async def test_removes_session(
        self, ssh_conn: asyncssh.SSHClientConnection, control_api: FakeControlAPI
    ) -> None:
        """Deregistering deletes the session on the bastion."""
        client = ControlClient(ssh_conn, control_api.port)
        session = (await client.register(_request())).session

        await client.deregister(session.session_id)

        assert control_api.sessions == {}

    async def test_unknown_session(
        self, ssh_conn: asyncssh.SSHClientConnection, control_api: FakeControlAPI
    ) -> None:
        """Deregistering an unknown session raises session_not_found."""
        client = ControlClient(ssh_conn, control_api.port)

        with pytest.raises(ControlAPIError) as caught:
            await client.deregister("gone")

        assert caught.value.code == "session_not_found"


class TestListSessions:
    async def test_filters_by_user(
        self, ssh_conn: asyncssh.SSHClientConnection, control_api: FakeControlAPI
    ) -> None:
        """Only the sessions of the requested user are returned."""
        control_api.add_foreign_session("bob", "api")
        client = ControlClient(ssh_conn, control_api.port)
        mine = (await client.register(_request())).session

        listed = await client.list_sessions("alice")

        assert [session.session_id for session in listed.sessions] == [mine.session_id]

    async def test_all_users(
        self, ssh_conn: asyncssh.SSHClientConnection, control_api: FakeControlAPI
    ) -> None:
        """Without a user, every session is returned."""
        control_api.add_foreign_session("bob", "api")
        control_api.add_foreign_session("carol", "web")
        client = ControlClient(ssh_conn, control_api.port)

        listed = await client.list_sessions()

        assert len(listed.sessions) == 2


class TestProtocolCheck:
    async def test_other_version(
        self, ssh_conn: asyncssh.SSHClientConnection, control_api: FakeControlAPI
    ) -> None:
        """A response with another protocol version raises ProtocolMismatchError."""
        control_api.protocol_value = "999"
        client = ControlClient(ssh_conn, control_api.port)

        with pytest.raises(ProtocolMismatchError) as caught:
            await client.list_sessions("alice")

        assert "'999'" in str(caught.value)

    async def test_missing_header(
        self, ssh_conn: asyncssh.SSHClientConnection, control_api: FakeControlAPI
    ) -> None:
        """A response without the protocol header raises ProtocolMismatchError."""
        control_api.protocol_value = None
        client = ControlClient(ssh_conn, control_api.port)

        with pytest.raises(ProtocolMismatchError) as caught:
            await client.list_sessions("alice")

        assert PROTOCOL_HEADER in str(caught.value)

    async def test_error_code(
        self,
        ssh_conn: asyncssh.SSHClientConnection,
        control_api: FakeControlAPI,
        raw_server: Callable[[bytes | None], Awaitable[int]],
    ) -> None:
        """An error body with code protocol_mismatch raises ProtocolMismatchError."""
        body = b'{"code":"protocol_mismatch","message":"Upgrade the laptop."}'
        reply = (
            b"HTTP/1.1 400 Bad Request\r\n"
            + f"{PROTOCOL_HEADER}: {PROTOCOL_VERSION}\r\n".encode()
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        client = ControlClient(ssh_conn, await raw_server(reply))

        with pytest.raises(ProtocolMismatchError) as caught:
            await client.list_sessions("alice")

        assert caught.value.code == "protocol_mismatch"


class TestMalformedResponses:
    async def test_error_without_body(
        self, ssh_conn: asyncssh.SSHClientConnection, control_api: FakeControlAPI
    ) -> None:
        """An error status without an ErrorBody raises invalid_response with the status."""
        control_api.garbage = (500, b"<html>oops</html>")
        client = ControlClient(ssh_conn, control_api.port)

        with pytest.raises(ControlAPIError) as caught:
            await client.list_sessions("alice")

        assert caught.value.code == "invalid_response"
        assert caught.value.status == 500

    async def test_wrong_message_shape(
        self, ssh_conn: asyncssh.SSHClientConnection, control_api: FakeControlAPI
    ) -> None:
        """A 200 whose body is not the expected message raises invalid_response."""
        control_api.garbage = (200, b'{"unexpected": true}')
        client = ControlClient(ssh_conn, control_api.port)

        with pytest.raises(ControlAPIError) as caught:
            await client.list_sessions("alice")

        assert caught.value.code == "invalid_response"
        assert "SessionList" in str(caught.value)

    async def test_not_http(
        self,
        ssh_conn: asyncssh.SSHClientConnection,
        raw_server: Callable[[bytes | None], Awaitable[int]],
    ) -> None:
        """Bytes that are not an HTTP response raise invalid_response."""
        client = ControlClient(ssh_conn, await raw_server(b"SSH-2.0-OpenSSH\r\n\r\n"))

        with pytest.raises(ControlAPIError) as caught:
            await client.list_sessions("alice")

        assert caught.value.code == "invalid_response"

    async def test_truncated_body(
        self,
        ssh_conn: asyncssh.SSHClientConnection,
        raw_server: Callable[[bytes | None], Awaitable[int]],
    ) -> None:
        """A body shorter than its Content-Length raises invalid_response."""
        reply = b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{}"
        port = await raw_server(reply)

        with pytest.raises(ControlAPIError) as caught:
            await http_request(ssh_conn, "127.0.0.1", port, "GET", "/")

        assert "ended after 2 of 50 bytes" in str(caught.value)


class TestHttpRequest:
    async def test_reaches_server(
        self, ssh_conn: asyncssh.SSHClientConnection, dev_server: int
    ) -> None:
        """A request through the SSH connection returns the server's status and body."""
        response = await http_request(ssh_conn, "127.0.0.1", dev_server, "GET", "/probe")

        assert response.status == 200
        assert response.body == b"hello from the laptop, path /probe"

    async def test_chunked_body(
        self,
        ssh_conn: asyncssh.SSHClientConnection,
        raw_server: Callable[[bytes | None], Awaitable[int]],
    ) -> None:
        """A chunked response body is decoded."""
        reply = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n"
        )
        port = await raw_server(reply)

        response = await http_request(ssh_conn, "127.0.0.1", port, "GET", "/")

        assert response.body == b"hello, world"

    async def test_rejects_header_injection(
        self, ssh_conn: asyncssh.SSHClientConnection, dev_server: int
    ) -> None:
        """A header value with a line break is rejected before anything is sent."""
        with pytest.raises(ValueError, match="line break"):
            await http_request(
                ssh_conn, "127.0.0.1", dev_server, "GET", "/", {"X-Test": "a\r\nEvil: 1"}
            )

    async def test_closed_port(self, ssh_conn: asyncssh.SSHClientConnection) -> None:
        """A port where nothing listens raises TunnelError naming host and port."""
        port = free_port()

        with pytest.raises(TunnelError) as caught:
            await http_request(ssh_conn, "127.0.0.1", port, "GET", "/")

        assert f"127.0.0.1:{port}" in str(caught.value)

    async def test_timeout(
        self,
        ssh_conn: asyncssh.SSHClientConnection,
        raw_server: Callable[[bytes | None], Awaitable[int]],
    ) -> None:
        """A server that never replies raises TunnelError saying the call timed out."""
        port = await raw_server(None)

        with pytest.raises(TunnelError) as caught:
            await http_request(ssh_conn, "127.0.0.1", port, "GET", "/", call_timeout=0.3)

        assert "timed out after 0.3s" in str(caught.value)

    async def test_closed_connection(
        self, ssh_conn: asyncssh.SSHClientConnection, dev_server: int
    ) -> None:
        """A request on a closed SSH connection raises TunnelError."""
        ssh_conn.close()
        await ssh_conn.wait_closed()

        with pytest.raises(TunnelError):
            await http_request(ssh_conn, "127.0.0.1", dev_server, "GET", "/")
