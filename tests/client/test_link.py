"""Reconnecting a `Link` through a real bastion after its SSH connection drops.

The connection runs through `DroppableRelay`, a TCP relay on 127.0.0.1 in front of the
bastion's embedded SSH server, so a test can cut it the way a lost network does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncssh
import pytest

from ephemwork.bastion.server import BastionOptions, BastionServer
from ephemwork.client import tunnel as tunnel_module
from ephemwork.client.link import Link
from ephemwork.client.tunnel import TunnelTarget
from ephemwork.errors import AwsSetupError
from ephemwork.wire import RouteKey, Session

from .conftest import wait_until

API = RouteKey("alice", "api")
WEB = RouteKey("alice", "web")


class DroppableRelay:
    """Relays TCP connections to *port* of 127.0.0.1; `drop` cuts every open connection."""

    port: int
    _target_port: int
    _server: asyncio.Server | None
    _writers: set[asyncio.StreamWriter]
    _tasks: set[asyncio.Task[None]]

    def __init__(self, target_port: int) -> None:
        self.port = 0
        self._target_port = target_port
        self._server = None
        self._writers = set()
        self._tasks = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def drop(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        self.drop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", self._target_port
        )
        self._writers.update((writer, upstream_writer))
        pumps = [
            asyncio.create_task(self._pump(reader, upstream_writer), name="relay-up"),
            asyncio.create_task(self._pump(upstream_reader, writer), name="relay-down"),
        ]
        self._tasks.update(pumps)
        await asyncio.gather(*pumps, return_exceptions=True)
        self._tasks.difference_update(pumps)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            self.drop()


class Bastion:
    """A real bastion, reached through a `DroppableRelay`, and a client key it accepts."""

    server: BastionServer
    relay: DroppableRelay
    key: asyncssh.SSHKey

    def __init__(self, server: BastionServer, relay: DroppableRelay, key: asyncssh.SSHKey) -> None:
        self.server = server
        self.relay = relay
        self.key = key

    def routes(self) -> list[str]:
        """Return the sorted routes that have a session on the bastion."""
        assert self.server.registry is not None
        return sorted(str(session.route) for session in self.server.registry.list())

    def target(self, prepare_keys: Callable[[], Awaitable[list[asyncssh.SSHKey]]]) -> TunnelTarget:
        """A tunnel target through the relay whose keys come from *prepare_keys*, as ec2's do."""
        return TunnelTarget(
            host="127.0.0.1",
            port=self.relay.port,
            username="alice",
            client_keys=None,
            known_hosts=None,
            control_port=self.server.control_address[1],
            proxy_port=self.server.proxy_address[1],
            public_url="http://staging.invalid/",
            description="test bastion",
            connect_timeout=5.0,
            prepare_keys=prepare_keys,
        )


@pytest.fixture
async def bastion(tmp_path: Path) -> AsyncIterator[Bastion]:
    """Run a bastion with its embedded SSH server behind a relay the test can cut."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    (tmp_path / "authorized_keys").write_bytes(key.export_public_key())
    options = BastionOptions(
        state_dir=tmp_path / "state",
        listen=("127.0.0.1", 0),
        control_listen=("127.0.0.1", 0),
        ssh_listen=("127.0.0.1", 0),
        authorized_keys=tmp_path / "authorized_keys",
    )
    async with BastionServer(options) as server:
        relay = DroppableRelay(server.ssh_address[1])
        await relay.start()
        try:
            yield Bastion(server, relay, key)
        finally:
            await relay.aclose()


@contextlib.asynccontextmanager
async def running(link: Link) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``link.run()`` in a task, and cancel it and close the link on exit."""
    task = asyncio.create_task(link.run(), name="test-link-run")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        link.close()


class TestReconnect:
    async def test_retries_key_push_error(self, bastion: Bastion) -> None:
        """A failed ec2 key push while reconnecting is retried, and the route comes back."""
        calls = 0

        async def prepare_keys() -> list[asyncssh.SSHKey]:
            nonlocal calls
            calls += 1
            if calls == 2:
                raise AwsSetupError("Cannot reach the AWS endpoint 'https://aws.invalid'.")
            return [bastion.key]

        messages: list[str] = []
        link = Link(bastion.target(prepare_keys), "test", notify=messages.append)
        await link.connect()
        await link.add_route(API, 9)

        async with running(link) as run:
            bastion.relay.drop()
            await wait_until(lambda: calls >= 3 and link.connected, "the link reconnected")
            await wait_until(
                lambda: any("routed again" in message for message in messages),
                "the route was reopened",
            )

            assert not run.done()
            assert any("Cannot reach the AWS endpoint" in message for message in messages)
            assert bastion.routes() == ["alice:api"]

    async def test_first_connect_error_fatal(self, bastion: Bastion) -> None:
        """An error of the first connection is raised, not retried."""

        async def prepare_keys() -> list[asyncssh.SSHKey]:
            raise AwsSetupError("No AWS credentials.")

        link = Link(bastion.target(prepare_keys), "test", notify=lambda message: None)

        with pytest.raises(AwsSetupError):
            await link.connect()


class TestRemoveRoute:
    async def test_during_key_push(self, bastion: Bastion) -> None:
        """A route removed while the connection is down is deregistered once it is back."""
        calls = 0
        pushing = asyncio.Event()
        release = asyncio.Event()

        async def prepare_keys() -> list[asyncssh.SSHKey]:
            nonlocal calls
            calls += 1
            if calls == 2:
                pushing.set()
                await release.wait()
            return [bastion.key]

        link = Link(bastion.target(prepare_keys), "test", notify=lambda message: None)
        await link.connect()
        await link.add_route(API, 9)
        await link.add_route(WEB, 10)

        async with running(link):
            bastion.relay.drop()
            await asyncio.wait_for(pushing.wait(), 10)
            await link.remove_route(API)
            release.set()
            await wait_until(lambda: bastion.routes() == ["alice:web"], "api was deregistered")
            await wait_until(lambda: link.session(WEB) is not None, "web is held")

            assert link.session(API) is None

    async def test_during_resume(self, bastion: Bastion, monkeypatch: pytest.MonkeyPatch) -> None:
        """A route removed while its resume waits on the bastion is closed when it opens."""
        resuming = asyncio.Event()
        release = asyncio.Event()
        resumed = asyncio.Event()
        original_resume = tunnel_module.Route._resume

        async def slow_resume(route: tunnel_module.Route, previous: Session) -> None:
            if route.key == API:
                resuming.set()
                await release.wait()
            await original_resume(route, previous)
            if route.key == API:
                resumed.set()

        async def prepare_keys() -> list[asyncssh.SSHKey]:
            return [bastion.key]

        link = Link(bastion.target(prepare_keys), "test", notify=lambda message: None)
        await link.connect()
        await link.add_route(API, 9)
        await link.add_route(WEB, 10)
        monkeypatch.setattr(tunnel_module.Route, "_resume", slow_resume)

        async with running(link):
            bastion.relay.drop()
            await asyncio.wait_for(resuming.wait(), 10)
            await link.remove_route(API)
            release.set()
            await asyncio.wait_for(resumed.wait(), 10)
            await wait_until(lambda: bastion.routes() == ["alice:web"], "api was deregistered")
            await wait_until(lambda: link.session(WEB) is not None, "web is held")

            assert link.session(API) is None
