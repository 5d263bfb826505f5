"""Tests for the composed bastion server: options, listeners, reaper, restart, signals."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import aiohttp
import asyncssh
import pytest

from ephemwork.bastion.server import (
    BastionOptions,
    BastionOptionsError,
    BastionServer,
    validate_options,
)
from ephemwork.errors import UsageError
from ephemwork.wire import PROTOCOL_HEADER, PROTOCOL_VERSION, RegisterResponse, RouteKey, decode

PROTOCOL = {PROTOCOL_HEADER: str(PROTOCOL_VERSION)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def options(tmp_path: Path, **overrides: object) -> BastionOptions:
    """Options with every listener on 127.0.0.1:0 and a tunnel range around a free port."""
    port = free_port()
    fields: dict[str, object] = {
        "state_dir": tmp_path / "state",
        "listen": ("127.0.0.1", 0),
        "control_listen": ("127.0.0.1", 0),
        "port_range": (port, port),
    }
    fields.update(overrides)
    return BastionOptions(**fields)  # type: ignore[arg-type]


class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


async def register(
    server: BastionServer, http: aiohttp.ClientSession, service: str = "api"
) -> RegisterResponse:
    host, port = server.control_address
    body = {"user": "alice", "service": service, "client": "test"}
    async with http.post(
        f"http://{host}:{port}/v1/sessions", json=body, headers=PROTOCOL
    ) as response:
        assert response.status == 201, await response.text()
        return decode(await response.read(), RegisterResponse)


class TestOptions:
    def test_remote_control_rejected(self, tmp_path: Path) -> None:
        """A non-loopback control address without the flag names the address and the flag."""
        with pytest.raises(BastionOptionsError) as caught:
            validate_options(options(tmp_path, control_listen=("0.0.0.0", 7070)))
        assert "'0.0.0.0'" in str(caught.value)
        assert "--allow-remote-control" in str(caught.value)

    def test_remote_control_allowed(self, tmp_path: Path) -> None:
        """With allow_remote_control a non-loopback control address is accepted."""
        validate_options(
            options(tmp_path, control_listen=("0.0.0.0", 7070), allow_remote_control=True)
        )

    def test_usage_error(self) -> None:
        """Option errors are usage errors (exit code 2)."""
        assert issubclass(BastionOptionsError, UsageError)

    @pytest.mark.parametrize(
        ("overrides", "expected"),
        [
            ({"port_range": (30000, 20000)}, "low end is above"),
            ({"port_range": (0, 10)}, "between 1 and 65535"),
            ({"lease_ttl": 0.0}, "lease_ttl must be positive"),
            ({"listen": ("127.0.0.1", 70000)}, "70000"),
            ({"listen": ("127.0.0.1", 20005), "port_range": (20000, 20009)}, "inside the tunnel"),
            ({"ssh_listen": ("127.0.0.1", 0)}, "--authorized-keys"),
            ({"ssh_listen": ("0.0.0.0", 0), "authorized_keys": Path("k")}, "not loopback"),
        ],
    )
    def test_invalid(self, tmp_path: Path, overrides: dict[str, object], expected: str) -> None:
        """Invalid options raise BastionOptionsError with a message naming the problem."""
        with pytest.raises(BastionOptionsError, match=expected):
            validate_options(options(tmp_path, **overrides))

    @pytest.mark.parametrize(
        ("field", "flag"), [("listen", "--listen"), ("control_listen", "--control-listen")]
    )
    async def test_port_in_use(self, tmp_path: Path, field: str, flag: str) -> None:
        """A listen port already taken raises BastionOptionsError naming address and flag."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(BastionOptionsError) as caught:
                async with BastionServer(options(tmp_path, **{field: ("127.0.0.1", port)})):
                    pass

        assert str(caught.value) == (
            f"Cannot listen on 127.0.0.1:{port} ({flag}): address already in use. "
            "Pick a free port, or stop the process that holds it."
        )


class TestServer:
    async def test_listeners(self, tmp_path: Path) -> None:
        """Port 0 binds real ports and the proxy serves its health check."""
        async with BastionServer(options(tmp_path)) as server, aiohttp.ClientSession() as http:
            host, port = server.proxy_address
            assert port != 0
            async with http.get(f"http://{host}:{port}/ephemwork-health") as response:
                assert await response.text() == "ok"

    async def test_no_ssh(self, tmp_path: Path) -> None:
        """Without ssh_listen there is no host key and no SSH address."""
        async with BastionServer(options(tmp_path)) as server:
            assert server.host_public_key is None
            with pytest.raises(RuntimeError):
                _ = server.ssh_address

    async def test_restart_keeps_sessions(self, tmp_path: Path) -> None:
        """A session registered before a restart is routable after it."""
        async with aiohttp.ClientSession() as http:
            async with BastionServer(options(tmp_path)) as first:
                registered = await register(first, http)
            async with BastionServer(options(tmp_path)) as second:
                assert second.registry is not None
                assert second.registry.lookup(RouteKey("alice", "api")) == registered.session

    async def test_reap(self, tmp_path: Path) -> None:
        """reap_expired removes sessions whose lease ended."""
        clock = Clock()
        async with (
            BastionServer(options(tmp_path, lease_ttl=10.0), clock=clock) as server,
            aiohttp.ClientSession() as http,
        ):
            await register(server, http)
            clock.now += 11.0
            assert server.reap_expired() == 1

    async def test_background_reaper(self, tmp_path: Path) -> None:
        """The background task removes an expired session on its own."""
        clock = Clock()
        opts = options(tmp_path, lease_ttl=10.0, reap_interval=0.01)
        async with BastionServer(opts, clock=clock) as server, aiohttp.ClientSession() as http:
            await register(server, http)
            assert server.registry is not None
            clock.now += 11.0
            for _ in range(500):
                if server.registry.lookup(RouteKey("alice", "api")) is None:
                    break
                await asyncio.sleep(0.01)
            assert server.registry.lookup(RouteKey("alice", "api")) is None


class TestEndToEnd:
    async def test_header_reaches_laptop(
        self, tmp_path: Path, authorized_keys: Path, client_key: asyncssh.SSHKey
    ) -> None:
        """A session registered through SSH routes a header request to the laptop side."""

        async def laptop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nlaptop")
            await writer.drain()
            writer.close()

        dev_server = await asyncio.start_server(laptop, "127.0.0.1", 0)
        dev_port = dev_server.sockets[0].getsockname()[1]
        opts = options(tmp_path, ssh_listen=("127.0.0.1", 0), authorized_keys=authorized_keys)

        async with dev_server, BastionServer(opts) as server:
            host_key = server.host_public_key
            assert host_key is not None
            ssh_host, ssh_port = server.ssh_address
            conn = await asyncssh.connect(
                ssh_host,
                ssh_port,
                username="dev",
                client_keys=[client_key],
                known_hosts=([host_key], [], []),
                agent_path=None,
                config=[],
            )
            async with conn:
                reader, writer = await conn.open_connection(*server.control_address)
                body = json.dumps({"user": "alice", "service": "api", "client": "e2e"}).encode()
                writer.write(
                    b"POST /v1/sessions HTTP/1.1\r\nHost: control\r\nConnection: close\r\n"
                    + f"{PROTOCOL_HEADER}: {PROTOCOL_VERSION}\r\n".encode()
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                reply = await reader.read()
                session = decode(reply.partition(b"\r\n\r\n")[2], RegisterResponse).session
                await conn.forward_remote_port("127.0.0.1", session.port, "127.0.0.1", dev_port)

                proxy_host, proxy_port = server.proxy_address
                async with (
                    aiohttp.ClientSession() as http,
                    http.get(
                        f"http://{proxy_host}:{proxy_port}/", headers={"X-Ephemwork": "alice:api"}
                    ) as response,
                ):
                    assert await response.text() == "laptop"

    async def test_dev_server_down(
        self, tmp_path: Path, authorized_keys: Path, client_key: asyncssh.SSHKey
    ) -> None:
        """A live forward whose laptop side refuses connections gets 502 naming the route."""
        opts = options(tmp_path, ssh_listen=("127.0.0.1", 0), authorized_keys=authorized_keys)
        async with BastionServer(opts) as server, aiohttp.ClientSession() as http:
            host_key = server.host_public_key
            assert host_key is not None
            session = (await register(server, http)).session
            conn = await asyncssh.connect(
                *server.ssh_address,
                username="dev",
                client_keys=[client_key],
                known_hosts=([host_key], [], []),
                agent_path=None,
                config=[],
            )
            async with conn:
                await conn.forward_remote_port("127.0.0.1", session.port, "127.0.0.1", free_port())
                proxy_host, proxy_port = server.proxy_address
                async with http.get(
                    f"http://{proxy_host}:{proxy_port}/", headers={"X-Ephemwork": "alice:api"}
                ) as response:
                    assert response.status == 502
                    assert "tunnel for 'alice:api' closed the connection" in await response.text()


# Runs serve_bastion with the options given as JSON in argv[1].
_SERVE = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from ephemwork.bastion.server import BastionOptions, serve_bastion
    from ephemwork.logs import configure_logging

    configure_logging("json", stream=sys.stdout)
    raw = json.loads(sys.argv[1])
    asyncio.run(serve_bastion(BastionOptions(
        state_dir=Path(raw["state_dir"]),
        listen=("127.0.0.1", 0),
        control_listen=("127.0.0.1", 0),
        port_range=tuple(raw["port_range"]),
    )))
    """
)


class TestServeBastion:
    @pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
    def test_signal_stops(self, tmp_path: Path, signum: signal.Signals) -> None:
        """serve_bastion logs its addresses, and stops cleanly on SIGTERM or SIGINT."""
        port = free_port()
        argument = json.dumps({"state_dir": str(tmp_path / "s"), "port_range": [port, port]})
        with subprocess.Popen(
            [sys.executable, "-c", _SERVE, argument],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        ) as process:
            assert process.stdout is not None
            events = []
            for line in process.stdout:
                events.append(json.loads(line))
                if events[-1]["event"] == "bastion.started":
                    break
            process.send_signal(signum)
            events += [json.loads(line) for line in process.stdout]
            assert process.wait(timeout=10) == 0

        started = next(e for e in events if e["event"] == "bastion.started")
        assert started["proxy"].startswith("127.0.0.1:")
        assert events[-1]["event"] == "bastion.stopped"


class TestImports:
    def test_no_client_or_aws_modules(self) -> None:
        """Importing the bastion server loads neither the client package nor an AWS library."""
        code = (
            "import sys, ephemwork.bastion.server\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('aioboto3', 'botocore', "
            "'boto3', 'aiobotocore') or m.startswith('ephemwork.client')]\n"
            "print(','.join(bad))\n"
        )
        completed = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        assert completed.stdout.strip() == ""
