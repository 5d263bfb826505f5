"""The real request path: bastion, OpenSSH reverse forward, dev server, all on 127.0.0.1.

`RequestPath` runs a `BastionServer` in the test process and registers routes through its
control API. It connects to the test's OpenSSH ``sshd`` with asyncssh and opens a reverse
forward from each route's tunnel port to a dev server on 127.0.0.1, as ``ephemwork up`` does.
`BastionProcess` runs ``serve-bastion`` as a subprocess instead, for tests that kill it, and
`ControlClient` makes the control API calls a laptop makes.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from types import TracebackType

import aiohttp
import asyncssh
from aiohttp import web

from ephemwork.bastion.server import BastionOptions, BastionServer
from ephemwork.wire import (
    CONTROL_API_PREFIX,
    PROTOCOL_HEADER,
    PROTOCOL_VERSION,
    LeaseRenewal,
    RegisterResponse,
    Session,
    SessionList,
    decode,
)
from helpers.cli import RunningCommand, ephemwork_argv
from helpers.ports import find_free_port
from helpers.sshd import SshdServer


def tunnel_port_range() -> tuple[int, int]:
    """Return a block of 20 ports above an ephemeral free port, for tunnel ports."""
    low = 30000 + find_free_port() % 20000
    return low, low + 19


class RequestPath:
    """A bastion in this process, reached from dev servers through a real sshd."""

    bastion: BastionServer
    http: aiohttp.ClientSession
    _sshd: SshdServer
    _ssh: asyncssh.SSHClientConnection | None
    _runners: list[web.AppRunner]
    _servers: list[asyncio.Server]

    def __init__(self, sshd: SshdServer, options: BastionOptions) -> None:
        self.bastion = BastionServer(options)
        self._sshd = sshd
        self._ssh = None
        self._runners = []
        self._servers = []

    @property
    def base(self) -> str:
        """The proxy's base URL, without a trailing slash."""
        host, port = self.bastion.proxy_address
        return f"http://{host}:{port}"

    @property
    def proxy_port(self) -> int:
        """The proxy's port on 127.0.0.1."""
        return self.bastion.proxy_address[1]

    async def __aenter__(self) -> RequestPath:
        await self.bastion.start()
        self.http = aiohttp.ClientSession()
        self._ssh = await connect_sshd(self._sshd)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.http.close()
        if self._ssh is not None:
            self._ssh.close()
            await self._ssh.wait_closed()
        for server in self._servers:
            server.close()
            await server.wait_closed()
        for runner in self._runners:
            await runner.cleanup()
        self.bastion.close()
        await self.bastion.wait_closed()

    async def serve_app(self, app: web.Application) -> int:
        """Serve *app* on 127.0.0.1 as a dev server and return its port."""
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port: int = runner.addresses[0][1]
        return port

    async def serve_raw(self, respond: bytes) -> tuple[int, list[bytes]]:
        """Serve a dev server that sends *respond* to every request; return its port and log.

        The log lists the raw head of each request it received.
        """
        received: list[bytes] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                received.append(await reader.readuntil(b"\r\n\r\n"))
                writer.write(respond)
                await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self._servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port, received

    async def register(self, user: str, service: str, dev_port: int) -> Session:
        """Register user:service and forward its tunnel port to *dev_port* through sshd."""
        host, port = self.bastion.control_address
        body = {"user": user, "service": service, "client": "test"}
        async with self.http.post(
            f"http://{host}:{port}/v1/sessions",
            json=body,
            headers={PROTOCOL_HEADER: str(PROTOCOL_VERSION)},
        ) as response:
            assert response.status == 201, await response.text()
            session = decode(await response.read(), RegisterResponse).session

        assert self._ssh is not None
        await self._ssh.forward_remote_port("127.0.0.1", session.port, "127.0.0.1", dev_port)
        return session


def path_options(state_dir: Path, **overrides: object) -> BastionOptions:
    """Bastion options on 127.0.0.1 ports chosen by the kernel, with a free tunnel range."""
    fields: dict[str, object] = {
        "state_dir": state_dir,
        "listen": ("127.0.0.1", 0),
        "control_listen": ("127.0.0.1", 0),
        "port_range": tunnel_port_range(),
    }
    fields.update(overrides)
    return BastionOptions(**fields)  # type: ignore[arg-type]


class BastionProcess:
    """``ephemwork serve-bastion`` as a subprocess on fixed 127.0.0.1 ports, restartable.

    Every start uses the same command line, so a restart after `kill` finds the same
    state folder and listens on the same proxy and control ports.
    """

    argv: list[str]
    environment: dict[str, str]
    proxy_port: int
    control_port: int
    port_range: tuple[int, int]
    runs: list[RunningCommand]

    def __init__(
        self,
        state_dir: Path,
        environment: dict[str, str],
        *,
        lease_ttl: float = 60.0,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.environment = environment
        self.proxy_port = find_free_port()
        self.control_port = find_free_port()
        self.port_range = tunnel_port_range()
        self.argv = ephemwork_argv(
            "--log-format",
            "json",
            "serve-bastion",
            "--listen",
            f"127.0.0.1:{self.proxy_port}",
            "--control-listen",
            f"127.0.0.1:{self.control_port}",
            "--port-range",
            f"{self.port_range[0]}-{self.port_range[1]}",
            "--state-dir",
            str(state_dir),
            "--lease-ttl",
            str(lease_ttl),
            *extra,
        )
        self.runs = []

    @property
    def base(self) -> str:
        """The proxy's base URL, without a trailing slash."""
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def control_base(self) -> str:
        """The control API's sessions URL."""
        return f"http://127.0.0.1:{self.control_port}{CONTROL_API_PREFIX}/sessions"

    @property
    def pid(self) -> int:
        """The process id of the current run."""
        return self.runs[-1].process.pid

    def start(self) -> None:
        """Start serve-bastion and block until it logs ``bastion.started``."""
        command = RunningCommand(self.argv, env=self.environment)
        self.runs.append(command)
        command.wait_for_line(r'"event": ?"bastion.started"')

    def kill(self) -> None:
        """SIGKILL the current run and wait for it to exit."""
        command = self.runs[-1]
        command.process.send_signal(signal.SIGKILL)
        command.wait(10)

    def stop(self) -> None:
        """Kill every run's process group; used in teardown."""
        for command in self.runs:
            command.kill_group()

    @property
    def output(self) -> str:
        """The output of every run, separated by a marker line."""
        return "\n--- restart ---\n".join(command.output for command in self.runs)


class ControlClient:
    """The control API calls a laptop makes, over a plain aiohttp session."""

    http: aiohttp.ClientSession
    base: str

    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http = http
        self.base = base

    async def register(self, user: str, service: str, preferred_port: int | None = None) -> Session:
        """Register user:service and return the new session."""
        body: dict[str, object] = {"user": user, "service": service, "client": "test"}
        if preferred_port is not None:
            body["preferred_port"] = preferred_port
        async with self.http.post(self.base, json=body, headers=_PROTOCOL) as response:
            assert response.status == 201, await response.text()
            return decode(await response.read(), RegisterResponse).session

    async def renew(self, session_id: str) -> float:
        """Renew the lease of *session_id* and return its new expiry."""
        async with self.http.post(f"{self.base}/{session_id}/renew", headers=_PROTOCOL) as response:
            assert response.status == 200, await response.text()
            return decode(await response.read(), LeaseRenewal).lease_expires_at

    async def sessions(self) -> list[Session]:
        """Return every session the bastion lists."""
        async with self.http.get(self.base, headers=_PROTOCOL) as response:
            assert response.status == 200, await response.text()
            return decode(await response.read(), SessionList).sessions


_PROTOCOL = {PROTOCOL_HEADER: str(PROTOCOL_VERSION)}


async def connect_sshd(sshd: SshdServer) -> asyncssh.SSHClientConnection:
    """Connect to the test's sshd as the laptop does, with the generated client key."""
    return await asyncssh.connect(
        sshd.host,
        sshd.port,
        username=sshd.username,
        client_keys=[str(sshd.client_key_path)],
        known_hosts=str(sshd.known_hosts_path),
        agent_path=None,
        config=[],
    )
