"""Tests for the embedded SSH server, driven by a real asyncssh client on loopback."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncssh
import pytest
import structlog.testing
from aiohttp import web

from ephemwork.bastion.sshserver import (
    HOST_KEY_FILE_NAME,
    EmbeddedSSHServer,
    ForwardPolicy,
    HostKeyError,
    is_loopback_host,
    load_or_create_host_key,
)
from ephemwork.errors import UsageError

BackendFactory = Callable[[web.Application], Awaitable[int]]


def free_port() -> int:
    """Return a loopback port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def find_socket(local: tuple[str, int], peer: tuple[str, int]) -> socket.socket:
    """Return a duplicate of this process's socket bound to *local* and connected to *peer*."""
    for name in os.listdir("/proc/self/fd"):
        try:
            candidate = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        try:
            if candidate.getsockname()[:2] == local and candidate.getpeername()[:2] == peer:
                return candidate
        except OSError:
            pass
        candidate.close()
    raise AssertionError(f"no socket from {local} to {peer} in this process")


def has_nodelay(sock: socket.socket) -> bool:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


async def hello_app_port(make_backend: BackendFactory, text: str = "hello") -> int:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=text)

    app = web.Application()
    app.router.add_get("/", hello)
    return await make_backend(app)


async def http_get(reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes]) -> bytes:
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    return await reader.read()


class Harness:
    """A running embedded server, its tunnel port range and a way to connect to it."""

    def __init__(
        self,
        server: EmbeddedSSHServer,
        host_key: asyncssh.SSHKey,
        client_key: asyncssh.SSHKey,
        tunnel_port: int,
        control_port: int,
    ) -> None:
        self.server = server
        self.host_key = host_key
        self.client_key = client_key
        self.tunnel_port = tunnel_port
        self.control_port = control_port

    def connect(
        self, key: asyncssh.SSHKey | None = None, username: str = "dev"
    ) -> Awaitable[asyncssh.SSHClientConnection]:
        host, port = self.server.address
        return asyncssh.connect(
            host,
            port,
            username=username,
            client_keys=[key or self.client_key],
            known_hosts=([self.host_key.convert_to_public()], [], []),
            agent_path=None,
            config=[],
        )


@pytest.fixture
async def harness(
    tmp_path: Path,
    authorized_keys: Path,
    client_key: asyncssh.SSHKey,
    make_backend: BackendFactory,
) -> AsyncIterator[Harness]:
    """An embedded server allowing one tunnel port and direct connections to a control app."""
    control_port = await hello_app_port(make_backend, "control")
    tunnel_port = free_port()
    host_key = load_or_create_host_key(None, tmp_path / "state")
    server = EmbeddedSSHServer(
        listen=("127.0.0.1", 0),
        host_key=host_key,
        authorized_keys=authorized_keys,
        policy=ForwardPolicy(
            port_range=(tunnel_port, tunnel_port), connect_ports=frozenset({control_port})
        ),
    )
    async with server:
        yield Harness(server, host_key, client_key, tunnel_port, control_port)


class TestForwardPolicy:
    policy = ForwardPolicy(port_range=(20000, 20009), connect_ports=frozenset({7070, 80}))

    @pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "LOCALHOST"])
    def test_listen_loopback_in_range(self, host: str) -> None:
        """A loopback listen inside the range is allowed."""
        assert self.policy.check_listen(host, 20005) is None

    @pytest.mark.parametrize("host", ["0.0.0.0", "", "::", "192.0.2.1", "example.com"])
    def test_listen_not_loopback(self, host: str) -> None:
        """A listen host other than 127.0.0.1 or localhost is rejected."""
        assert self.policy.check_listen(host, 20005) is not None

    @pytest.mark.parametrize("port", [0, 19999, 20010, 22])
    def test_listen_out_of_range(self, port: int) -> None:
        """A listen port outside the range, or 0, is rejected and the reason names the range."""
        assert "20000-20009" in str(self.policy.check_listen("127.0.0.1", port))

    def test_connect_allowed(self) -> None:
        """Connections to the allowed loopback ports are allowed."""
        assert self.policy.check_connect("127.0.0.1", 7070) is None

    @pytest.mark.parametrize(("host", "port"), [("127.0.0.1", 22), ("192.0.2.1", 7070)])
    def test_connect_rejected(self, host: str, port: int) -> None:
        """Other ports or hosts are rejected."""
        assert self.policy.check_connect(host, port) is not None


class TestHostKey:
    def test_created_once(self, tmp_path: Path) -> None:
        """The generated key is saved with mode 0600 and loaded again on the next start."""
        first = load_or_create_host_key(None, tmp_path)
        second = load_or_create_host_key(None, tmp_path)
        mode = stat.S_IMODE((tmp_path / HOST_KEY_FILE_NAME).stat().st_mode)
        assert mode == 0o600
        assert first.export_public_key() == second.export_public_key()

    def test_public_half_written(self, tmp_path: Path) -> None:
        """The public key is written beside the private one."""
        key = load_or_create_host_key(None, tmp_path)
        public = (tmp_path / (HOST_KEY_FILE_NAME + ".pub")).read_bytes()
        assert public == key.export_public_key()

    def test_explicit_path(self, tmp_path: Path) -> None:
        """An explicit key path is loaded as is."""
        key = asyncssh.generate_private_key("ssh-ed25519")
        key.write_private_key(tmp_path / "key")
        loaded = load_or_create_host_key(tmp_path / "key", tmp_path / "state")
        assert loaded.export_public_key() == key.export_public_key()

    def test_unreadable(self, tmp_path: Path) -> None:
        """A file that is not a key raises HostKeyError naming the file."""
        (tmp_path / "key").write_text("garbage")
        with pytest.raises(HostKeyError, match=r"'.*key'"):
            load_or_create_host_key(tmp_path / "key", tmp_path)


class TestServerOptions:
    def test_loopback_names(self) -> None:
        """localhost, 127.0.0.0/8 and ::1 count as loopback."""
        assert all(is_loopback_host(h) for h in ("localhost", "127.0.0.1", "127.1.2.3", "::1"))

    def test_not_loopback(self) -> None:
        """Wildcard and other addresses do not count as loopback."""
        assert not any(is_loopback_host(h) for h in ("0.0.0.0", "::", "192.0.2.1", "example"))

    def test_non_loopback_listen(self, tmp_path: Path, authorized_keys: Path) -> None:
        """A non-loopback listen address raises UsageError naming it."""
        with pytest.raises(UsageError, match=re.escape("'0.0.0.0'")):
            EmbeddedSSHServer(
                listen=("0.0.0.0", 0),
                host_key=asyncssh.generate_private_key("ssh-ed25519"),
                authorized_keys=authorized_keys,
                policy=ForwardPolicy(port_range=(20000, 20000), connect_ports=frozenset()),
            )

    async def test_missing_keys_warned(self, tmp_path: Path) -> None:
        """Starting without the authorized_keys file logs a warning naming its path."""
        missing = tmp_path / "nonexistent"
        server = EmbeddedSSHServer(
            listen=("127.0.0.1", 0),
            host_key=asyncssh.generate_private_key("ssh-ed25519"),
            authorized_keys=missing,
            policy=ForwardPolicy(port_range=(20000, 20000), connect_ports=frozenset()),
        )

        with structlog.testing.capture_logs() as logs:
            async with server:
                pass

        warnings = [line for line in logs if line["event"] == "sshserver.authorized_keys_missing"]
        assert len(warnings) == 1
        assert warnings[0]["path"] == str(missing)
        assert warnings[0]["log_level"] == "warning"


class TestAuthentication:
    async def test_authorized_key(self, harness: Harness) -> None:
        """A key from the authorized-keys file logs in."""
        async with await harness.connect() as conn:
            assert conn.get_extra_info("username") == "dev"

    async def test_unknown_key(self, harness: Harness, stranger_key: asyncssh.SSHKey) -> None:
        """A key missing from the file is rejected."""
        with pytest.raises(asyncssh.PermissionDenied):
            await harness.connect(stranger_key)

    async def test_key_added_later(
        self, harness: Harness, stranger_key: asyncssh.SSHKey, authorized_keys: Path
    ) -> None:
        """A key appended to the file after the start is accepted on the next connection."""
        with authorized_keys.open("ab") as file:
            file.write(stranger_key.export_public_key())
        async with await harness.connect(stranger_key):
            pass

    async def test_configured_username(
        self, tmp_path: Path, authorized_keys: Path, client_key: asyncssh.SSHKey
    ) -> None:
        """With a configured user name, another name is rejected even with a good key."""
        host_key = load_or_create_host_key(None, tmp_path)
        server = EmbeddedSSHServer(
            listen=("127.0.0.1", 0),
            host_key=host_key,
            authorized_keys=authorized_keys,
            policy=ForwardPolicy(port_range=(20000, 20000), connect_ports=frozenset()),
            username="ephemwork",
        )
        async with server:
            harness = Harness(server, host_key, client_key, 0, 0)
            with pytest.raises(asyncssh.PermissionDenied):
                await harness.connect(username="root")


class TestForwards:
    async def test_remote_forward(self, harness: Harness, make_backend: BackendFactory) -> None:
        """A remote forward on loopback inside the range carries HTTP to the laptop side."""
        laptop_port = await hello_app_port(make_backend, "from laptop")
        async with await harness.connect() as conn:
            await conn.forward_remote_port(
                "127.0.0.1", harness.tunnel_port, "127.0.0.1", laptop_port
            )
            reader, writer = await asyncio.open_connection("127.0.0.1", harness.tunnel_port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            response = await reader.read()
            writer.close()
            await writer.wait_closed()
        assert response.endswith(b"from laptop")

    async def test_remote_forward_localhost(self, harness: Harness) -> None:
        """A remote forward on localhost listens on 127.0.0.1."""
        async with await harness.connect() as conn:
            listener = await conn.forward_remote_port(
                "localhost", harness.tunnel_port, "127.0.0.1", 9
            )
            assert listener.get_port() == harness.tunnel_port
            _, writer = await asyncio.open_connection("127.0.0.1", harness.tunnel_port)
            writer.close()
            await writer.wait_closed()

    async def test_out_of_range(self, harness: Harness) -> None:
        """A remote forward outside the range is rejected."""
        async with await harness.connect() as conn:
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("127.0.0.1", free_port(), "127.0.0.1", 9)

    async def test_not_loopback(self, harness: Harness) -> None:
        """A remote forward on the wildcard address is rejected."""
        async with await harness.connect() as conn:
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("0.0.0.0", harness.tunnel_port, "127.0.0.1", 9)

    async def test_dynamic_port(self, harness: Harness) -> None:
        """A remote forward asking for port 0 is rejected."""
        async with await harness.connect() as conn:
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 9)

    async def test_direct_to_control(self, harness: Harness) -> None:
        """A direct connection to the control API port reaches it."""
        async with await harness.connect() as conn:
            reader, writer = await conn.open_connection("127.0.0.1", harness.control_port)
            assert (await http_get(reader, writer)).endswith(b"control")

    async def test_direct_to_control_by_localhost(self, harness: Harness) -> None:
        """A direct connection to localhost reaches the control API on 127.0.0.1."""
        async with await harness.connect() as conn:
            reader, writer = await conn.open_connection("localhost", harness.control_port)
            assert (await http_get(reader, writer)).endswith(b"control")

    async def test_direct_elsewhere(self, harness: Harness, make_backend: BackendFactory) -> None:
        """A direct connection to another loopback port is rejected, even one that listens."""
        other = await hello_app_port(make_backend)
        async with await harness.connect() as conn:
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_connection("127.0.0.1", other)


class TestSessions:
    async def test_exec(self, harness: Harness) -> None:
        """A command is rejected."""
        async with await harness.connect() as conn:
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.run("true")

    async def test_shell(self, harness: Harness) -> None:
        """An interactive shell with a pty is rejected."""
        async with await harness.connect() as conn:
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.create_process(term_type="xterm")

    async def test_subsystem(self, harness: Harness) -> None:
        """The sftp subsystem is rejected."""
        async with await harness.connect() as conn:
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.start_sftp_client()


class TestNoDelay:
    async def test_connection_socket(self, harness: Harness) -> None:
        """The server side of the SSH connection has TCP_NODELAY set."""
        async with await harness.connect() as conn:
            client_address = conn.get_extra_info("sockname")[:2]
            sock = find_socket(harness.server.address, client_address)
            with sock:
                assert has_nodelay(sock)

    async def test_forward_accepted_socket(
        self, harness: Harness, make_backend: BackendFactory
    ) -> None:
        """Sockets accepted by a remote forward's listener have TCP_NODELAY set."""
        laptop_port = await hello_app_port(make_backend)
        async with await harness.connect() as conn:
            await conn.forward_remote_port(
                "127.0.0.1", harness.tunnel_port, "127.0.0.1", laptop_port
            )
            reader, writer = await asyncio.open_connection("127.0.0.1", harness.tunnel_port)
            # A full exchange guarantees the listener has accepted the connection.
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await reader.readuntil(b"hello")
            accepted = find_socket(
                ("127.0.0.1", harness.tunnel_port), writer.get_extra_info("sockname")[:2]
            )
            with accepted:
                assert has_nodelay(accepted)
            writer.close()
            await writer.wait_closed()


class TestClose:
    async def test_close_ends_connections(self, harness: Harness) -> None:
        """Closing the server closes open client connections and their forwards."""
        conn = await harness.connect()
        await conn.forward_remote_port("127.0.0.1", harness.tunnel_port, "127.0.0.1", 9)
        harness.server.close()
        await asyncio.wait_for(harness.server.wait_closed(), 5)
        await asyncio.wait_for(conn.wait_closed(), 5)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", harness.tunnel_port)
