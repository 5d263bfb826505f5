"""Checks that the sshd fixture in conftest.py gives a real, usable OpenSSH server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncssh
import pytest
from aiohttp import web

from helpers.sshd import SshdFactory, SshdServer


async def _connect(
    server: SshdServer, client_key: Path | asyncssh.SSHKey
) -> asyncssh.SSHClientConnection:
    keys = [client_key] if isinstance(client_key, asyncssh.SSHKey) else [str(client_key)]
    return await asyncssh.connect(
        server.host,
        server.port,
        username=server.username,
        client_keys=keys,
        known_hosts=str(server.known_hosts_path),
        agent_path=None,
        config=[],
    )


async def _echo_request(request: web.Request) -> web.Response:
    body = await request.read()
    return web.Response(text=f"{request.method} {request.path} {len(body)}")


@pytest.fixture
async def http_server() -> AsyncIterator[int]:
    """An aiohttp server on 127.0.0.1 that returns "METHOD PATH BODY-LENGTH"; yields its port."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _echo_request)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()

    port: int = runner.addresses[0][1]
    yield port

    await runner.cleanup()


class TestSshdFixture:
    async def test_accepts_client_key(self, sshd: SshdServer) -> None:
        """The generated client key logs in as the current user."""
        async with await _connect(sshd, sshd.client_key_path) as connection:
            username = connection.get_extra_info("username")

        assert username == sshd.username

    async def test_host_key_matches(self, sshd: SshdServer) -> None:
        """The host key the server presents is the one in known_hosts and host_public_key."""
        async with await _connect(sshd, sshd.client_key_path) as connection:
            host_key = connection.get_server_host_key()

        assert host_key is not None
        assert host_key.export_public_key("openssh").decode().strip() == sshd.host_public_key

    async def test_remote_forward_carries_http(self, sshd: SshdServer, http_server: int) -> None:
        """A reverse forward on 127.0.0.1 delivers an HTTP request to the local server."""
        async with await _connect(sshd, sshd.client_key_path) as connection:
            listener = await connection.forward_remote_port(
                "127.0.0.1", 0, "127.0.0.1", http_server
            )
            url = f"http://127.0.0.1:{listener.get_port()}/through/tunnel"

            async with aiohttp.ClientSession() as session:
                async with session.post(url, data=b"x" * 1000) as response:
                    status = response.status
                    text = await response.text()

            listener.close()
            await listener.wait_closed()

        assert status == 200
        assert text == "POST /through/tunnel 1000"

    async def test_wrong_key_rejected(self, sshd: SshdServer) -> None:
        """A key that is not in authorized_keys is refused with PermissionDenied."""
        stranger = asyncssh.generate_private_key("ssh-ed25519")

        with pytest.raises(asyncssh.PermissionDenied):
            await _connect(sshd, stranger)

    async def test_unknown_host_key_rejected(self, sshd: SshdServer, tmp_path: Path) -> None:
        """A known_hosts entry with another key for the port makes the client refuse the server."""
        other_key = asyncssh.generate_private_key("ssh-ed25519")
        wrong_known_hosts = tmp_path / "wrong_known_hosts"
        wrong_known_hosts.write_bytes(
            f"[127.0.0.1]:{sshd.port} ".encode() + other_key.export_public_key("openssh")
        )

        with pytest.raises(asyncssh.HostKeyNotVerifiable):
            await asyncssh.connect(
                sshd.host,
                sshd.port,
                username=sshd.username,
                client_keys=[str(sshd.client_key_path)],
                known_hosts=str(wrong_known_hosts),
                agent_path=None,
                config=[],
            )

    async def test_options_replace_defaults(self, sshd_factory: SshdFactory) -> None:
        """An sshd_config keyword passed to the factory replaces the default forwarding policy."""
        server = sshd_factory(AllowTcpForwarding="no")

        async with await _connect(server, server.client_key_path) as connection:
            with pytest.raises(asyncssh.ChannelListenError):
                await connection.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 9)

    async def test_stop_closes_connections(self, sshd: SshdServer) -> None:
        """Stopping the server also ends the processes that serve open connections."""
        connection = await _connect(sshd, sshd.client_key_path)

        sshd.stop()

        await asyncio.wait_for(connection.wait_closed(), timeout=10)
        assert sshd.process.returncode is not None
