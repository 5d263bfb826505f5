"""The embedded SSH server of local mode: tunnels only, no shell.

It replaces the bastion's sshd when ``serve-bastion`` runs in dev mode or inside the
laptop's ``up`` for ``type = "local"``. It accepts public-key authentication for the keys
in an authorized-keys file, which it rereads on every connection, and allows exactly two
things:

- remote port forwards (``ssh -R``) that listen on loopback, on a port of the tunnel range;
- direct TCP connections (``ssh -L``) to the control API and to the proxy on loopback.

Every session channel (shell, exec, subsystem, and so agent and X11 forwarding, which ride
on a session) is rejected, and so is every other forward. A laptop that opens a session
channel to keep a pty, as it may against OpenSSH, must treat the rejection as harmless.

asyncio sets TCP_NODELAY on every TCP transport it creates (CPython 3.6 and later), which
covers both the SSH connections and the sockets accepted by the forward listeners.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable
from pathlib import Path
from types import TracebackType
from typing import cast

import asyncssh
import attrs
import structlog

from ephemwork.bastion.addresses import is_loopback_host
from ephemwork.errors import UsageError

HOST_KEY_FILE_NAME = "ssh_host_ed25519_key"

# Names that `server_requested` accepts as loopback. asyncssh lower-cases the host first.
LOOPBACK_LISTEN_HOSTS = frozenset({"127.0.0.1", "localhost"})

# A laptop that vanished without closing its connection is dropped after about a minute,
# which also frees its forward listeners.
KEEPALIVE_INTERVAL = 15.0
KEEPALIVE_COUNT_MAX = 4

logger = structlog.get_logger()


class HostKeyError(UsageError):
    """The SSH host key file cannot be read or created."""


@attrs.frozen
class ForwardPolicy:
    """The forwarding rules of the embedded SSH server, kept free of I/O for testing."""

    # Inclusive range of the ports remote forwards may listen on.
    port_range: tuple[int, int]
    # Loopback ports that direct TCP connections may reach: the control API and the proxy.
    connect_ports: frozenset[int]

    def check_listen(self, host: str, port: int) -> str | None:
        """Return why a remote forward on *host*:*port* is rejected, or ``None`` to allow it."""
        if host.lower() not in LOOPBACK_LISTEN_HOSTS:
            return f"listen host {host!r} is not 127.0.0.1 or localhost"

        low, high = self.port_range
        if not low <= port <= high:
            return f"port {port} is outside the tunnel port range {low}-{high}"

        return None

    def check_connect(self, host: str, port: int) -> str | None:
        """Return why a direct connection to *host*:*port* is rejected, or ``None``."""
        if host.lower() not in LOOPBACK_LISTEN_HOSTS:
            return f"destination host {host!r} is not 127.0.0.1 or localhost"

        if port not in self.connect_ports:
            allowed = ", ".join(str(p) for p in sorted(self.connect_ports))
            return f"destination port {port} is not one of {allowed}"

        return None


def load_or_create_host_key(path: Path | None, state_dir: Path) -> asyncssh.SSHKey:
    """Load the host key at *path*, or the one under *state_dir*, creating that one once.

    A created key is written with mode 0600, with its public half beside it in ``.pub``.
    """
    if path is not None:
        return _read_host_key(path)

    default_path = state_dir / HOST_KEY_FILE_NAME
    if default_path.exists():
        return _read_host_key(default_path)

    key = asyncssh.generate_private_key("ssh-ed25519", comment="ephemwork bastion")
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # O_EXCL: two processes starting at once must not overwrite each other's key.
        descriptor = os.open(default_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(key.export_private_key())
        default_path.with_name(default_path.name + ".pub").write_bytes(key.export_public_key())
    except FileExistsError:
        return _read_host_key(default_path)
    except OSError as exc:
        raise HostKeyError(
            f"Cannot create the SSH host key {str(default_path)!r}: {exc}. Check that the "
            "state folder is writable, or pass a host key path."
        ) from exc

    logger.info("sshserver.host_key_created", path=str(default_path))
    return key


def _read_host_key(path: Path) -> asyncssh.SSHKey:
    try:
        return asyncssh.read_private_key(path)
    except (OSError, asyncssh.KeyImportError) as exc:
        raise HostKeyError(
            f"Cannot read the SSH host key {str(path)!r}: {exc}. Pass a readable unencrypted "
            "private key, or remove the file to generate a new one."
        ) from exc


class _TunnelOnlyServer(asyncssh.SSHServer):
    """The per-connection policy hooks that asyncssh calls."""

    _owner: EmbeddedSSHServer
    _connection: asyncssh.SSHServerConnection | None
    _peer: str

    def __init__(self, owner: EmbeddedSSHServer) -> None:
        self._owner = owner
        self._connection = None
        self._peer = "unknown"

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._connection = conn
        peer = conn.get_extra_info("peername")
        if peer:
            self._peer = f"{peer[0]}:{peer[1]}"
        self._owner._connections.add(conn)
        logger.info("sshserver.connection_opened", peer=self._peer)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._connection is not None:
            self._owner._connections.discard(self._connection)
        logger.info("sshserver.connection_closed", peer=self._peer, error=exc and str(exc))

    def begin_auth(self, username: str) -> bool:
        expected = self._owner.username
        if expected is not None and username != expected:
            logger.warning("sshserver.unknown_user", peer=self._peer, username=username)
            return True

        # Reread on every connection so keys added while the server runs (local mode
        # writes the laptop's key just before it connects) are accepted.
        path = self._owner.authorized_keys
        try:
            keys = asyncssh.read_authorized_keys(str(path))
        except (OSError, asyncssh.KeyImportError) as exc:
            logger.error("sshserver.authorized_keys_unreadable", path=str(path), error=str(exc))
            return True

        assert self._connection is not None
        self._connection.set_authorized_keys(keys)
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # Reached only for keys that the authorized-keys file does not list.
        logger.warning(
            "sshserver.key_rejected",
            peer=self._peer,
            username=username,
            fingerprint=key.get_fingerprint(),
        )
        return False

    def auth_completed(self) -> None:
        logger.info("sshserver.authenticated", peer=self._peer)

    def session_requested(self) -> bool:
        logger.warning("sshserver.session_rejected", peer=self._peer)
        return False

    def server_requested(
        self, listen_host: str, listen_port: int
    ) -> bool | Awaitable[asyncssh.SSHListener]:
        reason = self._owner.policy.check_listen(listen_host, listen_port)
        if reason is not None:
            logger.warning(
                "sshserver.forward_rejected",
                peer=self._peer,
                listen_host=listen_host,
                listen_port=listen_port,
                reason=reason,
            )
            return False

        logger.info(
            "sshserver.forward_accepted",
            peer=self._peer,
            listen_host=listen_host,
            listen_port=listen_port,
        )
        assert self._connection is not None
        # "localhost" would also bind ::1; one IPv4 loopback socket is what the proxy uses.
        # NOTE: the channels of this listener get asyncssh's default window and packet size
        # (2 MiB, 32 KiB). asyncssh 2.24 takes no sizes for forward_local_port, and the
        # server-wide window and max_pktsize options apply to session channels only.
        return self._connection.forward_local_port(
            "127.0.0.1", listen_port, listen_host, listen_port
        )

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> bool | Awaitable[asyncssh.SSHTCPSession[bytes]]:
        reason = self._owner.policy.check_connect(dest_host, dest_port)
        if reason is not None:
            logger.warning(
                "sshserver.connect_rejected",
                peer=self._peer,
                dest_host=dest_host,
                dest_port=dest_port,
                reason=reason,
            )
            return False

        logger.debug("sshserver.connect_accepted", peer=self._peer, dest_port=dest_port)
        assert self._connection is not None
        # Resolving "localhost" could pick ::1, where the bastion does not listen.
        forwarder = self._connection.forward_connection("127.0.0.1", dest_port)
        # asyncssh's SSHForwarder implements the SSHTCPSession callbacks without the type.
        return cast(Awaitable[asyncssh.SSHTCPSession[bytes]], forwarder)


class EmbeddedSSHServer:
    """An asyncssh server that allows only the tunnels ephemwork needs."""

    listen: tuple[str, int]
    host_key: asyncssh.SSHKey
    authorized_keys: Path
    policy: ForwardPolicy
    username: str | None
    _acceptor: asyncssh.SSHAcceptor | None
    _connections: set[asyncssh.SSHServerConnection]

    def __init__(
        self,
        *,
        listen: tuple[str, int],
        host_key: asyncssh.SSHKey,
        authorized_keys: Path,
        policy: ForwardPolicy,
        username: str | None = None,
    ) -> None:
        if not is_loopback_host(listen[0]):
            raise UsageError(
                f"The embedded SSH server must listen on loopback, not {listen[0]!r}: "
                "use 127.0.0.1."
            )
        self.listen = listen
        self.host_key = host_key
        self.authorized_keys = authorized_keys
        self.policy = policy
        self.username = username
        self._acceptor = None
        self._connections = set()

    async def start(self) -> None:
        """Start listening; `address` is valid afterwards."""
        host, port = self.listen
        self._acceptor = await asyncssh.create_server(
            lambda: _TunnelOnlyServer(self),
            host,
            port,
            server_host_keys=[self.host_key],
            password_auth=False,
            kbdint_auth=False,
            gss_host=None,
            agent_forwarding=False,
            x11_forwarding=False,
            allow_pty=False,
            allow_scp=False,
            keepalive_interval=KEEPALIVE_INTERVAL,
            keepalive_count_max=KEEPALIVE_COUNT_MAX,
        )
        logger.info("sshserver.started", address=self.address)
        if not self.authorized_keys.is_file():
            # The file is read at each login, so keys may still be added. Until then every
            # login fails, which looks like a key problem on the laptop.
            logger.warning(
                "sshserver.authorized_keys_missing",
                path=str(self.authorized_keys),
                fix="create the file with the laptops' public keys, one per line",
            )

    @property
    def address(self) -> tuple[str, int]:
        """The host and port the server listens on (the actual port when 0 was given)."""
        if self._acceptor is None:
            raise RuntimeError("The SSH server is not started: call start() first.")
        host, port = self._acceptor.get_addresses()[0][:2]
        return (host, port)

    def close(self) -> None:
        """Stop accepting connections and close the open ones with their forwards."""
        if self._acceptor is not None:
            self._acceptor.close()
        for connection in list(self._connections):
            connection.close()

    async def wait_closed(self) -> None:
        """Wait until the listener and every connection are closed."""
        if self._acceptor is not None:
            await self._acceptor.wait_closed()
        for connection in list(self._connections):
            await connection.wait_closed()
        logger.info("sshserver.stopped", listen=self.listen)

    async def __aenter__(self) -> EmbeddedSSHServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()
