"""Tests of the SSH connection and routes against an embedded SSH server and the API test double."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aiohttp
import asyncssh
import pytest

from ephemwork.client import tunnel
from ephemwork.client.control import ControlClient
from ephemwork.client.tunnel import (
    Route,
    TunnelTarget,
    connect,
    cpu_has_aes_instructions,
    curl_hint,
)
from ephemwork.errors import ControlAPIError, TunnelError
from ephemwork.wire import RouteKey

from .conftest import FakeControlAPI, SSHServerFixture, free_port, wait_until

KEY = RouteKey("alice", "api")


async def _get(port: int, path: str = "/") -> str:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}{path}") as response:
            return await response.text()


async def _accepts_connections(port: int) -> bool:
    try:
        await _get(port)
    except aiohttp.ClientConnectionError:
        return False
    return True


class TestConnect:
    async def test_connects(self, make_target: Callable[..., TunnelTarget]) -> None:
        """The right key and host key give an open connection."""
        conn = await connect(make_target())

        assert not conn.is_closed()
        conn.close()
        await conn.wait_closed()

    async def test_wrong_key(self, make_target: Callable[..., TunnelTarget]) -> None:
        """An unauthorized key raises TunnelError naming the address and identity_file."""
        target = make_target(client_keys=[asyncssh.generate_private_key("ssh-ed25519")])

        with pytest.raises(TunnelError) as caught:
            await connect(target)

        assert target.address in str(caught.value)
        assert "identity_file" in str(caught.value)

    async def test_unknown_host_key(self, make_target: Callable[..., TunnelTarget]) -> None:
        """A host key missing from known_hosts raises TunnelError suggesting ssh-keyscan."""
        stranger = asyncssh.generate_private_key("ssh-ed25519").convert_to_public()
        target = make_target(known_hosts=([stranger], [], []))

        with pytest.raises(TunnelError) as caught:
            await connect(target)

        assert "not trusted" in str(caught.value)
        assert "ssh-keyscan" in str(caught.value)

    async def test_refused(self, make_target: Callable[..., TunnelTarget]) -> None:
        """A port where nothing listens raises TunnelError saying the connection was refused."""
        target = make_target(port=free_port())

        with pytest.raises(TunnelError) as caught:
            await connect(target)

        assert f"Connection to {target.address} refused" in str(caught.value)

    async def test_missing_identity_file(
        self, make_target: Callable[..., TunnelTarget], tmp_path: Path
    ) -> None:
        """An identity file path that does not exist raises TunnelError naming it."""
        missing = str(tmp_path / "id_missing")

        with pytest.raises(TunnelError) as caught:
            await connect(make_target(client_keys=[missing]))

        assert repr(missing) in str(caught.value)

    async def test_identity_file_path(
        self,
        make_target: Callable[..., TunnelTarget],
        ssh_server: SSHServerFixture,
        tmp_path: Path,
    ) -> None:
        """An identity file path is loaded and authenticates."""
        key_file = tmp_path / "id_ed25519"
        ssh_server.client_key.write_private_key(str(key_file))

        conn = await connect(make_target(client_keys=[str(key_file)]))

        assert not conn.is_closed()
        conn.close()
        await conn.wait_closed()

    async def test_pty_on_request(
        self, make_target: Callable[..., TunnelTarget], ssh_server: SSHServerFixture
    ) -> None:
        """With want_pty the connection opens a session with a dumb terminal."""
        conn = await connect(make_target(want_pty=True))

        await wait_until(lambda: ssh_server.session_terms == ["dumb"], "the pty session opens")
        conn.close()
        await conn.wait_closed()

    async def test_no_pty_by_default(
        self, make_target: Callable[..., TunnelTarget], ssh_server: SSHServerFixture
    ) -> None:
        """Without want_pty the connection opens no session."""
        conn = await connect(make_target())
        await ControlClient(conn, make_target().control_port).list_sessions()

        assert ssh_server.session_terms == []
        conn.close()
        await conn.wait_closed()


class TestRoute:
    async def test_forwards_to_dev_server(
        self,
        ssh_conn: asyncssh.SSHClientConnection,
        control_api: FakeControlAPI,
        dev_server: int,
    ) -> None:
        """A request to the session's port on the server side reaches the local dev server."""
        control = ControlClient(ssh_conn, control_api.port)

        async with Route(ssh_conn, control, KEY, dev_server, "test laptop") as route:
            body = await _get(route.bastion_port, "/health")

        assert body == "hello from the laptop, path /health"

    async def test_registers_client_and_takeover(
        self,
        ssh_conn: asyncssh.SSHClientConnection,
        control_api: FakeControlAPI,
        dev_server: int,
    ) -> None:
        """The registration carries the route, the client description and the takeover flag."""
        control_api.add_foreign_session("alice", "api")
        control = ControlClient(ssh_conn, control_api.port)

        async with Route(ssh_conn, control, KEY, dev_server, "test laptop", takeover=True):
            pass

        request = control_api.register_requests[0]
        assert (request.user, request.service) == ("alice", "api")
        assert request.client == "test laptop"
        assert request.takeover is True
        assert request.replaces_session_id is None

    async def test_takeover_names_replaced_session(
        self,
        ssh_conn: asyncssh.SSHClientConnection,
        control_api: FakeControlAPI,
        dev_server: int,
    ) -> None:
        """A takeover sends the replaced session's id; a plain registration never does."""
        control = ControlClient(ssh_conn, control_api.port)

        async with Route(
            ssh_conn, control, KEY, dev_server, "laptop", takeover=True, replaces_session_id="s-old"
        ):
            pass
        async with Route(ssh_conn, control, KEY, dev_server, "laptop", replaces_session_id="s-2"):
            pass

        assert control_api.register_requests[0].replaces_session_id == "s-old"
        assert control_api.register_requests[1].replaces_session_id is None

    async def test_route_taken(
        self,
        ssh_conn: asyncssh.SSHClientConnection,
        control_api: FakeControlAPI,
        dev_server: int,
    ) -> None:
        """Opening a route that another laptop serves raises route_taken."""
        control_api.add_foreign_session("alice", "api")
        route = Route(ssh_conn, ControlClient(ssh_conn, control_api.port), KEY, dev_server, "t")

        with pytest.raises(ControlAPIError) as caught:
            await route.open()

        assert caught.value.code == "route_taken"

    async def test_renews_lease(
        self,
        ssh_conn: asyncssh.SSHClientConnection,
        control_api: FakeControlAPI,
        dev_server: int,
    ) -> None:
        """The route renews its session's lease in the background."""
        control_api.lease_ttl = 0.3
        control = ControlClient(ssh_conn, control_api.port)

        async with Route(ssh_conn, control, KEY, dev_server, "t") as route:
            await wait_until(lambda: len(control_api.renewals) >= 2, "two renewals")
            session_id = route.session.session_id

        assert set(control_api.renewals) == {session_id}

    async def test_close_deregisters(
        self,
        ssh_conn: asyncssh.SSHClientConnection,
        control_api: FakeControlAPI,
        dev_server: int,
    ) -> None:
        """Closing the route deletes the session and stops the forward."""
        route = Route(ssh_conn, ControlClient(ssh_conn, control_api.port), KEY, dev_server, "t")
        session = await route.open()

        route.close()
        await route.wait_closed()

        assert control_api.deregistrations == [session.session_id]
        assert not await _accepts_connections(session.port)

    async def test_close_is_idempotent(
        self,
        ssh_conn: asyncssh.SSHClientConnection,
        control_api: FakeControlAPI,
        dev_server: int,
    ) -> None:
        """A second close() deregisters nothing more."""
        route = Route(ssh_conn, ControlClient(ssh_conn, control_api.port), KEY, dev_server, "t")
        await route.open()

        route.close()
        route.close()
        await route.wait_closed()

        assert len(control_api.deregistrations) == 1

    async def test_close_survives_lost_session(
        self,
        ssh_conn: asyncssh.SSHClientConnection,
        control_api: FakeControlAPI,
        dev_server: int,
    ) -> None:
        """Closing after the bastion forgot the session still closes the forward."""
        route = Route(ssh_conn, ControlClient(ssh_conn, control_api.port), KEY, dev_server, "t")
        session = await route.open()
        control_api.sessions.clear()

        route.close()
        await route.wait_closed()

        assert not await _accepts_connections(session.port)

    async def test_registers_again_same_port(
        self,
        ssh_conn: asyncssh.SSHClientConnection,
        control_api: FakeControlAPI,
        dev_server: int,
    ) -> None:
        """A renewal that finds no session registers again, asking for the old port."""
        control_api.lease_ttl = 0.3
        control = ControlClient(ssh_conn, control_api.port)

        async with Route(ssh_conn, control, KEY, dev_server, "t") as route:
            old = route.session
            control_api.sessions.clear()
            await wait_until(lambda: len(control_api.register_requests) == 2, "re-registration")
            await wait_until(lambda: route.session != old, "the route takes the new session")
            body = await _get(route.bastion_port)

        assert control_api.register_requests[1].preferred_port == old.port
        assert control_api.register_requests[1].takeover is False
        assert body.startswith("hello from the laptop")

    async def test_registers_again_new_port(
        self,
        ssh_conn: asyncssh.SSHClientConnection,
        control_api: FakeControlAPI,
        dev_server: int,
    ) -> None:
        """When the bastion hands out another port, the forward moves to it."""
        control_api.lease_ttl = 0.3
        control_api.honor_preferred_port = False
        control = ControlClient(ssh_conn, control_api.port)

        async with Route(ssh_conn, control, KEY, dev_server, "t") as route:
            old = route.session
            control_api.sessions.clear()
            await wait_until(lambda: route.session != old, "the route takes the new session")
            await wait_until(lambda: len(control_api.renewals) >= 1, "a renewal after moving")
            body = await _get(route.bastion_port)
            old_port_open = await _accepts_connections(old.port)

        assert route.bastion_port != old.port
        assert body.startswith("hello from the laptop")
        assert not old_port_open

    async def test_lost_to_other_laptop(
        self,
        ssh_conn: asyncssh.SSHClientConnection,
        control_api: FakeControlAPI,
        dev_server: int,
    ) -> None:
        """If another laptop took the route meanwhile, wait_lost raises route_taken."""
        control_api.lease_ttl = 0.3
        route = Route(ssh_conn, ControlClient(ssh_conn, control_api.port), KEY, dev_server, "t")
        await route.open()
        control_api.sessions.clear()
        control_api.add_foreign_session("alice", "api")

        with pytest.raises(ControlAPIError) as caught:
            await route.wait_lost()

        assert caught.value.code == "route_taken"
        route.close()
        await route.wait_closed()

    async def test_lost_with_connection(
        self,
        make_target: Callable[..., TunnelTarget],
        control_api: FakeControlAPI,
        dev_server: int,
    ) -> None:
        """When the SSH connection closes, wait_lost raises TunnelError naming the route."""
        control_api.lease_ttl = 0.3
        conn = await connect(make_target())
        route = Route(conn, ControlClient(conn, control_api.port), KEY, dev_server, "t")
        await route.open()
        conn.close()

        with pytest.raises(TunnelError) as caught:
            await route.wait_lost()

        assert "alice:api" in str(caught.value)
        route.close()
        await route.wait_closed()

    async def test_wait_lost_after_close(
        self,
        ssh_conn: asyncssh.SSHClientConnection,
        control_api: FakeControlAPI,
        dev_server: int,
    ) -> None:
        """wait_lost returns normally once the route was closed."""
        route = Route(ssh_conn, ControlClient(ssh_conn, control_api.port), KEY, dev_server, "t")
        await route.open()

        route.close()
        await route.wait_closed()

        async with asyncio.timeout(5):
            await route.wait_lost()


class TestCiphers:
    async def test_aes_gcm_first(
        self, make_target: Callable[..., TunnelTarget], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With AES instructions the connection negotiates AES-GCM."""
        monkeypatch.setattr(tunnel, "cpu_has_aes_instructions", lambda: True)
        conn = await connect(make_target())

        assert conn.get_extra_info("send_cipher") == "aes128-gcm@openssh.com"
        conn.close()
        await conn.wait_closed()

    async def test_default_without_aes(
        self, make_target: Callable[..., TunnelTarget], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without AES instructions asyncssh's own order applies, chacha20 first."""
        monkeypatch.setattr(tunnel, "cpu_has_aes_instructions", lambda: False)
        conn = await connect(make_target())

        assert conn.get_extra_info("send_cipher") == "chacha20-poly1305@openssh.com"
        conn.close()
        await conn.wait_closed()


class TestCpuHasAesInstructions:
    def test_x86_flag(self, tmp_path: Path) -> None:
        """An x86 flags line with aes counts."""
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 aes avx2\n")

        assert cpu_has_aes_instructions(cpuinfo)

    def test_arm_feature(self, tmp_path: Path) -> None:
        """An ARM Features line with aes counts."""
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text("Features\t: fp asimd aes pmull sha1\n")

        assert cpu_has_aes_instructions(cpuinfo)

    def test_similar_flag_only(self, tmp_path: Path) -> None:
        """Flags that only contain the letters aes, such as vaes alone, do not count."""
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text("flags\t\t: fpu sse2 vaes\n")

        assert not cpu_has_aes_instructions(cpuinfo)

    def test_missing_file(self, tmp_path: Path) -> None:
        """Without /proc/cpuinfo, as on macOS, the answer is no."""
        assert not cpu_has_aes_instructions(tmp_path / "absent")


class TestCurlHint:
    def test_quotes_header(self, make_target: Callable[..., TunnelTarget]) -> None:
        """The hint sends the route header to the public URL."""
        hint = curl_hint(make_target(public_url="https://staging.example/"), KEY)

        assert hint == "curl -H 'X-Ephemwork: alice:api' https://staging.example/"
