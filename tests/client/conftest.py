"""Fixtures for the client tests: an embedded SSH server, a control API test double, a dev server.

`FakeControlAPI` is a test double of the bastion's control API. It follows the wire contract
(paths, status codes, error codes, protocol header) closely enough to exercise the client,
but it is not the real bastion, which is tested end to end with the CLI.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncssh
import attrs
import pytest
from aiohttp import web

from ephemwork.client.tunnel import TunnelTarget, connect
from ephemwork.wire import (
    CONTROL_API_PREFIX,
    PROTOCOL_HEADER,
    PROTOCOL_VERSION,
    ErrorBody,
    LeaseRenewal,
    RegisterRequest,
    RegisterResponse,
    Session,
    SessionList,
    WireFormatError,
    decode,
    encode,
)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def port_is_free(port: int) -> bool:
    """Return whether a new server could listen on *port* of 127.0.0.1 right now."""
    with socket.socket() as probe:
        # Dev servers set SO_REUSEADDR, so connections in TIME_WAIT do not hold the port.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def wait_until(condition: Callable[[], bool], description: str, limit: float = 5.0) -> None:
    """Poll *condition* until it is true; fail the test naming *description* after *limit* s."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {description}")
        await asyncio.sleep(0.02)


async def start_app(app: web.Application) -> tuple[web.AppRunner, int]:
    """Serve *app* on a free port of 127.0.0.1 and return its runner and port."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    _host, port = runner.addresses[0][:2]
    return runner, port


@attrs.define
class FakeControlAPI:
    """Control API test double: sessions in a dict, plus switches to misbehave on purpose."""

    lease_ttl: float = 30.0
    # Protocol header value sent on every response; None leaves the header out.
    protocol_value: str | None = str(PROTOCOL_VERSION)
    # When false, preferred_port is ignored, as when another session uses that port.
    honor_preferred_port: bool = True
    # When set, every response has this status and body instead of the real response.
    garbage: tuple[int, bytes] | None = None
    sessions: dict[str, Session] = attrs.field(factory=dict)
    register_requests: list[RegisterRequest] = attrs.field(factory=list)
    renewals: list[str] = attrs.field(factory=list)
    deregistrations: list[str] = attrs.field(factory=list)
    request_protocols: list[str | None] = attrs.field(factory=list)
    port: int = 0

    def application(self) -> web.Application:
        """Build the aiohttp application that serves the contract."""
        app = web.Application(middlewares=[self._protocol_middleware])
        prefix = CONTROL_API_PREFIX
        app.router.add_post(f"{prefix}/sessions", self._register)
        app.router.add_get(f"{prefix}/sessions", self._list)
        app.router.add_post(f"{prefix}/sessions/{{session_id}}/renew", self._renew)
        app.router.add_delete(f"{prefix}/sessions/{{session_id}}", self._deregister)
        return app

    def add_foreign_session(self, user: str, service: str) -> Session:
        """Register a session as another laptop would, bypassing HTTP."""
        session = self._new_session(user, service, "other laptop", free_port())
        self.sessions[session.session_id] = session
        return session

    @web.middleware
    async def _protocol_middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        self.request_protocols.append(request.headers.get(PROTOCOL_HEADER))
        if self.garbage is not None:
            response: web.StreamResponse = web.Response(
                status=self.garbage[0], body=self.garbage[1]
            )
        elif request.headers.get(PROTOCOL_HEADER) != str(PROTOCOL_VERSION):
            response = _error(400, "protocol_mismatch", "The laptop speaks another version.")
        else:
            response = await handler(request)

        if self.protocol_value is not None:
            response.headers[PROTOCOL_HEADER] = self.protocol_value
        return response

    async def _register(self, request: web.Request) -> web.Response:
        try:
            register = decode(await request.read(), RegisterRequest)
        except WireFormatError as exc:
            return _error(400, "invalid_request", str(exc))
        self.register_requests.append(register)

        holders = [
            session
            for session in self.sessions.values()
            if (session.user, session.service) == (register.user, register.service)
        ]
        if holders and not register.takeover:
            return _error(409, "route_taken", f"{register.user}:{register.service} is taken.")
        for session in holders:
            del self.sessions[session.session_id]

        port = free_port()
        preferred = register.preferred_port
        if self.honor_preferred_port and preferred is not None and port_is_free(preferred):
            port = preferred

        session = self._new_session(register.user, register.service, register.client, port)
        self.sessions[session.session_id] = session
        body = encode(RegisterResponse(session=session, lease_ttl=self.lease_ttl))
        return web.Response(status=201, body=body, content_type="application/json")

    async def _renew(self, request: web.Request) -> web.Response:
        session_id = request.match_info["session_id"]
        session = self.sessions.get(session_id)
        if session is None:
            return _error(404, "session_not_found", f"No session {session_id!r}.")

        self.renewals.append(session_id)
        expires = time.time() + self.lease_ttl
        self.sessions[session_id] = attrs.evolve(session, lease_expires_at=expires)
        renewal = LeaseRenewal(session_id, lease_expires_at=expires, lease_ttl=self.lease_ttl)
        return web.Response(body=encode(renewal), content_type="application/json")

    async def _deregister(self, request: web.Request) -> web.Response:
        session_id = request.match_info["session_id"]
        if self.sessions.pop(session_id, None) is None:
            return _error(404, "session_not_found", f"No session {session_id!r}.")
        self.deregistrations.append(session_id)
        return web.Response(status=204)

    async def _list(self, request: web.Request) -> web.Response:
        user = request.query.get("user")
        sessions = [s for s in self.sessions.values() if user is None or s.user == user]
        body = encode(SessionList(sessions=sessions))
        return web.Response(body=body, content_type="application/json")

    def _new_session(self, user: str, service: str, client: str, port: int) -> Session:
        now = time.time()
        return Session(
            session_id=uuid.uuid4().hex,
            user=user,
            service=service,
            port=port,
            client=client,
            registered_at=now,
            lease_expires_at=now + self.lease_ttl,
        )


def _error(status: int, code: str, message: str) -> web.Response:
    body = encode(ErrorBody(code=code, message=message))
    return web.Response(status=status, body=body, content_type="application/json")


class _TunnelServer(asyncssh.SSHServer):
    """SSH server that allows direct-tcpip channels and remote forwards, like the bastion's sshd."""

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> bool:
        return True

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return True


@attrs.define
class SSHServerFixture:
    """An embedded SSH server on 127.0.0.1 and the keys that reach it."""

    port: int
    host_key: asyncssh.SSHKey
    client_key: asyncssh.SSHKey
    # Terminal type of every session opened on the server (None without a pty).
    session_terms: list[str | None]

    def known_hosts(self) -> tuple[list[asyncssh.SSHKey], list[asyncssh.SSHKey], list[Any]]:
        """Return the trusted-keys tuple that accepts this server's host key."""
        return ([self.host_key.convert_to_public()], [], [])


@pytest.fixture
async def ssh_server() -> AsyncIterator[SSHServerFixture]:
    """Run an SSH server that accepts one generated client key."""
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    authorized = asyncssh.import_authorized_keys(client_key.export_public_key().decode())
    session_terms: list[str | None] = []

    async def handle_session(process: asyncssh.SSHServerProcess[str]) -> None:
        session_terms.append(process.term_type)
        try:
            await process.stdin.read()
        except (asyncssh.Error, OSError):
            pass
        process.exit(0)

    acceptor = await asyncssh.create_server(
        _TunnelServer,
        "127.0.0.1",
        0,
        server_host_keys=[host_key],
        authorized_client_keys=authorized,
        process_factory=handle_session,
    )
    try:
        yield SSHServerFixture(acceptor.get_port(), host_key, client_key, session_terms)
    finally:
        acceptor.close()
        await acceptor.wait_closed()


@pytest.fixture
async def control_api() -> AsyncIterator[FakeControlAPI]:
    """Serve a `FakeControlAPI` on a free port of 127.0.0.1."""
    fake = FakeControlAPI()
    runner, fake.port = await start_app(fake.application())
    try:
        yield fake
    finally:
        await runner.cleanup()


@pytest.fixture
async def dev_server() -> AsyncIterator[int]:
    """Serve a tiny "dev server" on a free port and return the port."""

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hello from the laptop, path {request.path}")

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    runner, port = await start_app(app)
    try:
        yield port
    finally:
        await runner.cleanup()


@pytest.fixture
def make_target(
    ssh_server: SSHServerFixture, control_api: FakeControlAPI
) -> Callable[..., TunnelTarget]:
    """Return a factory of `TunnelTarget` for the embedded server; keywords override fields."""

    def make(**overrides: Any) -> TunnelTarget:
        fields: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": ssh_server.port,
            "username": "alice",
            "client_keys": [ssh_server.client_key],
            "known_hosts": ssh_server.known_hosts(),
            "control_port": control_api.port,
            "proxy_port": free_port(),
            "public_url": "http://staging.invalid/",
            "description": f"ssh alice@127.0.0.1:{ssh_server.port}",
            "connect_timeout": 5.0,
        }
        fields.update(overrides)
        return TunnelTarget(**fields)

    return make


@pytest.fixture
async def ssh_conn(
    make_target: Callable[..., TunnelTarget],
) -> AsyncIterator[asyncssh.SSHClientConnection]:
    """An SSH connection from the client code to the embedded server."""
    conn = await connect(make_target())
    try:
        yield conn
    finally:
        conn.close()
        await conn.wait_closed()
