"""Tests for the control API, served on 127.0.0.1:0 and called with aiohttp."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from ephemwork.bastion.control import create_control_app
from ephemwork.bastion.registry import SessionRegistry
from ephemwork.wire import (
    PROTOCOL_HEADER,
    PROTOCOL_VERSION,
    ErrorBody,
    LeaseRenewal,
    RegisterResponse,
    SessionList,
    decode,
)

PROTOCOL = {PROTOCOL_HEADER: str(PROTOCOL_VERSION)}


class Clock:
    """A clock the test moves by hand."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


class ControlAPI:
    """A client for one control API server."""

    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http = http
        self.base = base

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes, aiohttp.ClientResponse]:
        data = body
        if body is not None and not isinstance(body, bytes):
            data = json.dumps(body).encode()
        async with self.http.request(
            method, self.base + path, data=data, headers=PROTOCOL if headers is None else headers
        ) as response:
            return response.status, await response.read(), response

    async def register(self, **fields: Any) -> tuple[int, bytes]:
        body = {"user": "alice", "service": "api", "client": "host pid 1", **fields}
        status, data, _ = await self.call("POST", "/v1/sessions", body)
        return status, data


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def api(
    make_registry: Callable[..., SessionRegistry],
    make_backend: Callable[[web.Application], Awaitable[int]],
    clock: Clock,
) -> AsyncIterator[ControlAPI]:
    """A control API over a fresh registry with ports 20000-20001 and a 30 s lease."""
    registry = make_registry(port_range=(20000, 20001), lease_ttl=30.0)
    port = await make_backend(create_control_app(registry, clock=clock))
    async with aiohttp.ClientSession() as http:
        yield ControlAPI(http, f"http://127.0.0.1:{port}")


def error_code(data: bytes) -> str:
    return decode(data, ErrorBody).code


class TestProtocol:
    async def test_missing_header(self, api: ControlAPI) -> None:
        """A request without the protocol header gets 400 protocol_mismatch."""
        status, data, _ = await api.call("GET", "/v1/sessions", headers={})
        assert status == 400
        assert error_code(data) == "protocol_mismatch"

    async def test_wrong_version(self, api: ControlAPI) -> None:
        """A request with another protocol version gets 400 naming the version."""
        status, data, _ = await api.call("GET", "/v1/sessions", headers={PROTOCOL_HEADER: "99"})
        assert status == 400
        assert "'99'" in decode(data, ErrorBody).message

    async def test_header_on_errors(self, api: ControlAPI) -> None:
        """Error responses carry the protocol header."""
        _, _, response = await api.call("GET", "/v1/sessions", headers={})
        assert response.headers[PROTOCOL_HEADER] == str(PROTOCOL_VERSION)

    async def test_header_on_success(self, api: ControlAPI) -> None:
        """Successful responses carry the protocol header."""
        _, _, response = await api.call("GET", "/v1/sessions")
        assert response.headers[PROTOCOL_HEADER] == str(PROTOCOL_VERSION)

    async def test_unknown_path(self, api: ControlAPI) -> None:
        """An unknown path gets a JSON 404 with the protocol header."""
        status, data, response = await api.call("GET", "/v1/nothing")
        assert status == 404
        assert error_code(data) == "not_found"
        assert response.headers[PROTOCOL_HEADER] == str(PROTOCOL_VERSION)


class TestRegister:
    async def test_created(self, api: ControlAPI, clock: Clock) -> None:
        """A valid request gets 201 with the session and the lease length."""
        status, data = await api.register()
        assert status == 201
        response = decode(data, RegisterResponse)
        assert response.lease_ttl == 30.0
        assert response.session.port == 20000
        assert response.session.lease_expires_at == clock.now + 30.0

    async def test_bad_json(self, api: ControlAPI) -> None:
        """A body that is not JSON gets 400 invalid_request."""
        status, data, _ = await api.call("POST", "/v1/sessions", b"{not json")
        assert status == 400
        assert error_code(data) == "invalid_request"

    async def test_bad_shape(self, api: ControlAPI) -> None:
        """A body missing a field gets 400 invalid_request."""
        status, data, _ = await api.call("POST", "/v1/sessions", {"user": "alice"})
        assert status == 400
        assert error_code(data) == "invalid_request"

    async def test_invalid_name(self, api: ControlAPI) -> None:
        """A service outside the name rule gets 400 invalid_request naming it."""
        status, data = await api.register(service="API!")
        assert status == 400
        assert "'API!'" in decode(data, ErrorBody).message

    async def test_route_taken(self, api: ControlAPI) -> None:
        """A second register of a live route gets 409 route_taken."""
        await api.register()
        status, data = await api.register(client="other pid 2")
        assert status == 409
        assert error_code(data) == "route_taken"

    async def test_takeover(self, api: ControlAPI) -> None:
        """A takeover of a live route that names its session id gets 201."""
        _, data = await api.register()
        old_id = decode(data, RegisterResponse).session.session_id
        status, _ = await api.register(takeover=True, replaces_session_id=old_id)
        assert status == 201

    async def test_takeover_without_id(self, api: ControlAPI) -> None:
        """A takeover of a live route without its session id gets 409 and keeps the route."""
        _, data = await api.register()
        old = decode(data, RegisterResponse).session
        status, body = await api.register(client="other pid 2", takeover=True)
        _, listing, _ = await api.call("GET", "/v1/sessions")
        assert status == 409
        assert error_code(body) == "route_taken"
        assert "wait 30 s" in decode(body, ErrorBody).message
        assert [s.client for s in decode(listing, SessionList).sessions] == [old.client]

    async def test_ports_exhausted(self, api: ControlAPI) -> None:
        """A register beyond the port range gets 503 ports_exhausted."""
        await api.register(service="a")
        await api.register(service="b")
        status, data = await api.register(service="c")
        assert status == 503
        assert error_code(data) == "ports_exhausted"


class TestRenewDeregisterList:
    async def test_renew(self, api: ControlAPI, clock: Clock) -> None:
        """A renewal gets 200 with the new expiry."""
        _, data = await api.register()
        session_id = decode(data, RegisterResponse).session.session_id
        clock.now += 20.0
        status, body, _ = await api.call("POST", f"/v1/sessions/{session_id}/renew")
        assert status == 200
        assert decode(body, LeaseRenewal).lease_expires_at == clock.now + 30.0

    async def test_renew_unknown(self, api: ControlAPI) -> None:
        """Renewing an unknown session gets 404 session_not_found."""
        status, data, _ = await api.call("POST", "/v1/sessions/nope/renew")
        assert status == 404
        assert error_code(data) == "session_not_found"

    async def test_deregister(self, api: ControlAPI) -> None:
        """Deregistering gets 204, and the session is gone from the list."""
        _, data = await api.register()
        session_id = decode(data, RegisterResponse).session.session_id
        status, _, _ = await api.call("DELETE", f"/v1/sessions/{session_id}")
        assert status == 204
        _, body, _ = await api.call("GET", "/v1/sessions")
        assert decode(body, SessionList).sessions == []

    async def test_deregister_unknown(self, api: ControlAPI) -> None:
        """Deregistering an unknown session gets 404 session_not_found."""
        status, data, _ = await api.call("DELETE", "/v1/sessions/nope")
        assert status == 404
        assert error_code(data) == "session_not_found"

    async def test_list_by_user(self, api: ControlAPI) -> None:
        """?user= filters the list."""
        await api.register(user="alice")
        await api.register(user="bob")
        status, body, _ = await api.call("GET", "/v1/sessions?user=bob")
        assert status == 200
        assert [s.user for s in decode(body, SessionList).sessions] == ["bob"]

    async def test_list_hides_session_ids(self, api: ControlAPI) -> None:
        """The list leaves every session id empty, since the id is what renews and deletes."""
        _, data = await api.register()
        session = decode(data, RegisterResponse).session
        _, body, _ = await api.call("GET", "/v1/sessions")
        listed = decode(body, SessionList).sessions
        assert [s.session_id for s in listed] == [""]
        assert session.session_id.encode() not in body
        assert [(s.user, s.service, s.port) for s in listed] == [("alice", "api", session.port)]

    async def test_list_invalid_user(self, api: ControlAPI) -> None:
        """An invalid ?user= gets 400 invalid_request."""
        status, data, _ = await api.call("GET", "/v1/sessions?user=Bob%21")
        assert status == 400
        assert error_code(data) == "invalid_request"
