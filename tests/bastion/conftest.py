"""Fixtures for the bastion tests: registries, HTTP back ends and SSH keys on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import asyncssh
import pytest
from aiohttp import web

from ephemwork.bastion.registry import SessionRegistry
from ephemwork.wire import RegisterRequest, Session

# Wide enough that a back end on any ephemeral port can be registered as its tunnel port.
WIDE_PORT_RANGE = (1024, 65535)

RegistryFactory = Callable[..., SessionRegistry]
BackendFactory = Callable[[web.Application], Awaitable[int]]


@pytest.fixture
def make_registry(tmp_path: Path) -> Iterator[RegistryFactory]:
    """Open registries under tmp_path; every one opened is closed after the test."""
    opened: list[SessionRegistry] = []

    def make(
        state_dir: Path | None = None,
        *,
        port_range: tuple[int, int] = (20000, 20009),
        lease_ttl: float = 60.0,
    ) -> SessionRegistry:
        # Tests register the ports of listening back ends, so the listener check is off.
        registry = SessionRegistry.open(
            state_dir or tmp_path / "state",
            port_range=port_range,
            lease_ttl=lease_ttl,
            port_is_free=lambda _: True,
        )
        opened.append(registry)
        return registry

    yield make

    for registry in opened:
        registry.close()


@pytest.fixture
async def make_backend() -> AsyncIterator[BackendFactory]:
    """Serve aiohttp applications on 127.0.0.1:0 and return their ports."""
    runners: list[web.AppRunner] = []

    async def make(app: web.Application) -> int:
        # A short shutdown timeout keeps a test whose handler is stuck from hanging teardown.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port: int = runner.addresses[0][1]
        return port

    yield make

    for runner in runners:
        await runner.cleanup()


@pytest.fixture
def register_on_port() -> Callable[..., Session]:
    """Return a function that registers user:service with a given tunnel port."""

    def register(
        registry: SessionRegistry, user: str, service: str, port: int, now: float = 1000.0
    ) -> Session:
        request = RegisterRequest(user=user, service=service, client="test", preferred_port=port)
        session = registry.register(request, now)
        assert session.port == port
        return session

    return register


@pytest.fixture(scope="session")
def client_key() -> asyncssh.SSHKey:
    """A client key listed in the authorized-keys file."""
    return asyncssh.generate_private_key("ssh-ed25519")


@pytest.fixture(scope="session")
def stranger_key() -> asyncssh.SSHKey:
    """A client key listed nowhere."""
    return asyncssh.generate_private_key("ssh-ed25519")


@pytest.fixture
def authorized_keys(tmp_path: Path, client_key: asyncssh.SSHKey) -> Path:
    """An authorized-keys file that lists client_key."""
    path = tmp_path / "authorized_keys"
    path.write_bytes(client_key.export_public_key())
    return path
