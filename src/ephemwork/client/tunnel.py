"""The SSH connection to the bastion and the routes held through it.

`connect` opens one asyncssh connection with keepalives and turns every connection failure
into a `TunnelError` that names the host, port and fix. A `Route` then serves one
``user:service`` through that connection:

1. it registers a session with the control API (`ControlClient`), which allocates a port on
   the bastion's loopback;
2. it requests the SSH server to listen on that port and forward each connection back to the
   dev server on this laptop (a reverse forward, ``ssh -R``);
3. a background task renews the lease every third of its lifetime, and registers again if
   the bastion has forgotten the session, for example after its lease expired while the
   laptop slept;
4. ``close()`` deregisters the session and closes the forward.

Several routes may share one connection. A route lives on one connection: after the
connection is lost, `ephemwork.client.link` opens a new `Route` on the next connection with
the old session, which keeps the same bastion port when it is still free.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import socket
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import asyncssh
import attrs
import structlog

from ephemwork.client.control import ControlClient
from ephemwork.client.forwarding import ServiceGate
from ephemwork.errors import ControlAPIError, ProtocolMismatchError, TunnelError
from ephemwork.wire import ROUTE_HEADER, RegisterRequest, RegisterResponse, RouteKey, Session

log = structlog.get_logger()

# An unanswered keepalive every 5 s, three times in a row, declares the connection dead after
# about 15 s, well inside the shortest lease the bastion hands out.
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT_MAX = 3

DEFAULT_CONNECT_TIMEOUT = 15.0

# Seconds between retries after a failed renewal, capped by a third of the lease.
RENEW_RETRY_DELAY = 2.0

# After a reconnect, the SSH server may still hold the old forward's port until it notices
# that the old connection is gone, so listening on it is retried this often, this far apart.
FORWARD_RETRIES = 6
FORWARD_RETRY_DELAY = 0.5

# Flow-control window and maximum packet size, in bytes, for the connection's channels.
# asyncssh's defaults (2 MiB, 32 KiB) split a response into more packets, each one an
# encryption and a send() call.
CHANNEL_WINDOW = 8 * 1024 * 1024
CHANNEL_MAX_PKTSIZE = 256 * 1024

# AES-GCM runs in OpenSSL's AES instructions, and beats chacha20-poly1305 where the CPU
# has them. chacha20 and aes-ctr stay in the list, so every OpenSSH server still agrees on one.
AES_GCM_FIRST_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
)

CPUINFO_PATH = Path("/proc/cpuinfo")


@attrs.frozen
class TunnelTarget:
    """Connection settings of a bastion: SSH address, credentials and its loopback ports."""

    host: str
    port: int
    username: str
    # Private keys or identity file paths; None lets asyncssh load ~/.ssh/id_* and the agent.
    client_keys: Sequence[asyncssh.SSHKey] | Sequence[str] | None
    # Passed to asyncssh.connect as is: a known_hosts path, a trusted-keys tuple, () for
    # ~/.ssh/known_hosts, or None to skip host key checking (only for an embedded server).
    known_hosts: object
    control_port: int
    proxy_port: int
    # Base URL that reaches the bastion proxy, such as the staging ALB, for the curl hint.
    public_url: str
    # Human-readable summary for state and logs, such as "ssh alice@bastion.example:22".
    description: str
    # OpenSSH's sshd sets TCP_NODELAY on a connection only while it has a pty session, so a
    # pty makes small forwarded responses leave the bastion without Nagle delay.
    want_pty: bool = False
    # Command whose stdin and stdout carry the SSH stream, such as an SSM session.
    proxy_command: str | Sequence[str] | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    # Called before every connection attempt, reconnects included, to produce the client
    # keys; it replaces client_keys. EC2 targets use it to push a fresh key each time,
    # because EC2 Instance Connect accepts a pushed key for 60 seconds only.
    prepare_keys: Callable[[], Awaitable[list[asyncssh.SSHKey]]] | None = None

    @property
    def address(self) -> str:
        """``host:port`` as used in messages."""
        return f"{self.host}:{self.port}"


def curl_hint(target: TunnelTarget, key: RouteKey) -> str:
    """Return a curl command line that sends a request through the bastion to this route."""
    header = shlex.quote(f"{ROUTE_HEADER}: {key.header_value}")
    return f"curl -H {header} {shlex.quote(target.public_url)}"


def client_description() -> str:
    """Describe this laptop process for the bastion: host name and process id."""
    return f"{socket.gethostname()} pid {os.getpid()}"


async def connect(
    target: TunnelTarget, *, client_factory: Callable[[], asyncssh.SSHClient] | None = None
) -> asyncssh.SSHClientConnection:
    """Open the SSH connection to *target*, or raise `TunnelError` naming the problem and fix.

    With ``target.want_pty`` the connection also gets an idle pty session; a server that
    rejects it only costs a warning. *client_factory* lets the caller watch the connection's
    events, such as the reason it was lost.
    """
    problem = missing_file(target)
    if problem is not None:
        raise TunnelError(problem)

    options: dict[str, Any] = {
        "username": target.username,
        "known_hosts": target.known_hosts,
        "keepalive_interval": KEEPALIVE_INTERVAL,
        "keepalive_count_max": KEEPALIVE_COUNT_MAX,
        "connect_timeout": target.connect_timeout,
        "window": CHANNEL_WINDOW,
        "max_pktsize": CHANNEL_MAX_PKTSIZE,
    }
    if cpu_has_aes_instructions():
        options["encryption_algs"] = AES_GCM_FIRST_CIPHERS
    # asyncssh reads None as "no public key authentication", so leave it out to keep defaults.
    if target.client_keys is not None:
        options["client_keys"] = target.client_keys
    if target.proxy_command is not None:
        options["proxy_command"] = target.proxy_command
    if target.prepare_keys is not None:
        options["client_keys"] = await target.prepare_keys()
    if client_factory is not None:
        options["client_factory"] = client_factory

    log.info("tunnel.connecting", target=target.description, address=target.address)
    with _map_connect_errors(target):
        conn = await asyncssh.connect(target.host, target.port, **options)
    log.info("tunnel.connected", target=target.description, address=target.address)

    if target.want_pty:
        await _open_idle_pty(conn, target)

    return conn


def cpu_has_aes_instructions(cpuinfo: Path = CPUINFO_PATH) -> bool:
    """Return whether *cpuinfo* lists the ``aes`` flag (x86) or feature (ARM).

    Returns False where the file is missing, as on macOS, so asyncssh keeps its own order.
    """
    try:
        text = cpuinfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        return False

    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features") and "aes" in value.split():
            return True
    return False


def missing_file(target: TunnelTarget) -> str | None:
    """Return a message naming *target*'s identity or known_hosts file that does not exist."""
    paths: list[tuple[str, str]] = []
    if target.client_keys is not None:
        paths += [("identity file", key) for key in target.client_keys if isinstance(key, str)]
    if isinstance(target.known_hosts, str):
        paths.append(("known_hosts file", target.known_hosts))

    for kind, path in paths:
        if not Path(path).expanduser().is_file():
            return (
                f"The {kind} {path!r} for {target.address} does not exist. Fix the path in "
                "the [tunnel] table of ephemwork.toml."
            )
    return None


@contextlib.contextmanager
def _map_connect_errors(target: TunnelTarget) -> Iterator[None]:
    where = target.address
    try:
        yield
    except asyncssh.HostKeyNotVerifiable as exc:
        raise TunnelError(
            f"The SSH host key of {where} is not trusted ({exc.reason}). If the bastion is new "
            f"or was rebuilt, check its fingerprint and add its key to known_hosts, for example "
            f"with `ssh-keyscan -p {target.port} {target.host}`. Otherwise something may be "
            "intercepting the connection."
        ) from exc
    except asyncssh.PermissionDenied as exc:
        raise TunnelError(
            f"SSH authentication as {target.username!r} on {where} failed ({exc.reason}). "
            "Check tunnel.identity_file and that its public key is authorized for that user "
            "on the bastion."
        ) from exc
    except asyncssh.KeyImportError as exc:
        raise TunnelError(
            f"Cannot load the SSH identity for {where}: {exc}. Check tunnel.identity_file."
        ) from exc
    except asyncssh.DisconnectError as exc:
        raise TunnelError(
            f"The SSH server at {where} closed the connection during login: {exc.reason}."
        ) from exc
    except ConnectionRefusedError as exc:
        raise TunnelError(
            f"Connection to {where} refused. Check tunnel.host and tunnel.port, and that sshd "
            "runs on the bastion."
        ) from exc
    except TimeoutError as exc:
        raise TunnelError(
            f"Connecting to {where} timed out after {target.connect_timeout:g}s. Check "
            "tunnel.host, tunnel.port and your network or VPN."
        ) from exc
    except socket.gaierror as exc:
        raise TunnelError(
            f"Cannot resolve the host name {target.host!r}: {exc.strerror}. Check tunnel.host."
        ) from exc
    except OSError as exc:
        raise TunnelError(f"Cannot connect to {where}: {exc.strerror or exc}.") from exc


async def _open_idle_pty(conn: asyncssh.SSHClientConnection, target: TunnelTarget) -> None:
    try:
        # No command means a shell on a pty. Its stdin stays open and nothing is ever sent,
        # so it idles until the connection closes. The connection's channel table keeps
        # the process object alive.
        await conn.create_process(
            term_type="dumb",
            request_pty="force",
            stdout=asyncssh.DEVNULL,
            stderr=asyncssh.DEVNULL,
        )
    except (asyncssh.Error, OSError) as exc:
        log.warning("tunnel.pty_failed", target=target.description, error=str(exc))
        return
    log.info("tunnel.pty_opened", target=target.description)


class Route:
    """One registered ``user:service`` route, its reverse forward and its lease renewal.

    Use ``async with Route(...) as route`` or call `open`, then ``close()`` and
    ``await wait_closed()``.
    """

    key: RouteKey
    local_port: int
    _conn: asyncssh.SSHClientConnection
    _control: ControlClient
    _client: str
    _takeover: bool
    _replaces_session_id: str | None
    _session: Session | None
    _lease_ttl: float
    _listener: asyncssh.SSHListener | None
    _renew_task: asyncio.Task[None] | None
    _close_task: asyncio.Task[None] | None
    _closed: asyncio.Event
    _gate: ServiceGate | None
    _abandoned: bool

    def __init__(
        self,
        conn: asyncssh.SSHClientConnection,
        control: ControlClient,
        key: RouteKey,
        local_port: int,
        client: str,
        *,
        takeover: bool = False,
        replaces_session_id: str | None = None,
        gate: ServiceGate | None = None,
    ) -> None:
        self.key = key
        self.local_port = local_port
        self._conn = conn
        self._control = control
        self._client = client
        self._takeover = takeover
        self._replaces_session_id = replaces_session_id
        self._session = None
        self._lease_ttl = 0.0
        self._listener = None
        self._renew_task = None
        self._close_task = None
        self._closed = asyncio.Event()
        self._gate = gate
        self._abandoned = False

    @property
    def session(self) -> Session:
        """The bastion's current session for this route; it changes after a re-registration."""
        if self._session is None:
            raise RuntimeError("Route.session is only available after Route.open().")
        return self._session

    @property
    def bastion_port(self) -> int:
        """The port on the bastion's loopback that forwards to this laptop."""
        return self.session.port

    async def open(self, previous: Session | None = None) -> Session:
        """Register the route, open the reverse forward and start renewing the lease.

        With *previous*, the session held over a connection that was lost, the route renews
        that session and listens on its port again. If the bastion has forgotten it, the
        route registers again and asks for the same port.
        """
        if self._session is not None or self._close_task is not None:
            raise RuntimeError("Route.open() may be called once, before close().")

        if previous is not None:
            await self._resume(previous)
        else:
            await self._register(preferred_port=None, takeover=self._takeover)

        try:
            self._listener = await self._forward_with_retries(self.session.port)
        except BaseException:
            # Without the forward the session only produces 502s, so give it back now
            # instead of waiting for its lease to expire.
            await self._deregister()
            raise

        self._renew_task = asyncio.create_task(
            self._renew_until_failed(), name=f"ephemwork-renew-{self.key}"
        )
        return self.session

    async def _resume(self, previous: Session) -> None:
        self._session = previous
        try:
            renewal = await self._control.renew(previous.session_id)
        except ControlAPIError as exc:
            if exc.code != "session_not_found":
                raise
            log.warning("route.session_lost", route=str(self.key), session_id=previous.session_id)
            # takeover=False: if someone else took the route meanwhile, that session wins.
            await self._register(preferred_port=previous.port, takeover=False)
            return

        self._lease_ttl = renewal.lease_ttl
        log.info(
            "route.resumed",
            route=str(self.key),
            session_id=previous.session_id,
            bastion_port=previous.port,
        )

    async def _forward_with_retries(self, bastion_port: int) -> asyncssh.SSHListener:
        for attempt in range(1, FORWARD_RETRIES + 1):
            try:
                return await self._forward(bastion_port)
            except _PortBusyError as exc:
                if attempt == FORWARD_RETRIES:
                    raise exc.error from None
                log.info(
                    "route.forward_retry",
                    route=str(self.key),
                    bastion_port=bastion_port,
                    attempt=attempt,
                )
                await asyncio.sleep(FORWARD_RETRY_DELAY)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def wait_lost(self) -> None:
        """Wait until the route stops renewing; raise the error that ended it.

        Returns normally when the route was closed with ``close()``.
        """
        if self._renew_task is None:
            raise RuntimeError("Route.wait_lost() is only available after Route.open().")

        # asyncio.wait, unlike awaiting the task, leaves the task running if our caller
        # is cancelled.
        await asyncio.wait([self._renew_task])
        if self._renew_task.cancelled():
            return
        error = self._renew_task.exception()
        if error is not None:
            raise error

    def abandon(self) -> None:
        """Stop renewing without deregistering, because the connection is already gone.

        The session stays on the bastion until its lease expires, so the next connection
        can resume it on the same port.
        """
        self._abandoned = True
        self.close()

    def close(self) -> None:
        """Start deregistering the session and closing the forward; idempotent."""
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(
                self._shutdown(), name=f"ephemwork-close-route-{self.key}"
            )

    async def wait_closed(self) -> None:
        """Wait until ``close()`` has deregistered the session and closed the forward."""
        await self._closed.wait()

    async def __aenter__(self) -> Route:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()

    async def _register(self, *, preferred_port: int | None, takeover: bool) -> RegisterResponse:
        request = RegisterRequest(
            user=self.key.user,
            service=self.key.service,
            client=self._client,
            preferred_port=preferred_port,
            takeover=takeover,
            # The bastion hands a live route to another laptop only with proof that this
            # side owned it: the session id from local state.
            replaces_session_id=self._replaces_session_id if takeover else None,
        )
        response = await self._control.register(request)
        self._session = response.session
        self._lease_ttl = response.lease_ttl
        log.info(
            "route.registered",
            route=str(self.key),
            session_id=response.session.session_id,
            bastion_port=response.session.port,
            lease_ttl=response.lease_ttl,
        )
        return response

    async def _forward(self, bastion_port: int) -> asyncssh.SSHListener:
        try:
            # create_server, unlike forward_remote_port, takes the channel window and packet
            # size; without them the forwarded channels get asyncssh's defaults, not the
            # connection's.
            listener = await self._conn.create_server(
                self._session_factory(),
                "127.0.0.1",
                bastion_port,
                window=CHANNEL_WINDOW,
                max_pktsize=CHANNEL_MAX_PKTSIZE,
            )
        except asyncssh.ChannelListenError as exc:
            raise _PortBusyError(
                TunnelError(
                    f"The bastion's SSH server rejected listening on 127.0.0.1:{bastion_port} "
                    f"for {self.key}: {exc}. Check that its sshd allows remote forwarding "
                    "(AllowTcpForwarding) and that no other process holds the port."
                )
            ) from exc
        except (asyncssh.Error, OSError) as exc:
            raise TunnelError(
                f"The SSH connection failed while opening the forward for {self.key}: {exc}."
            ) from exc

        log.info(
            "route.forward_opened",
            route=str(self.key),
            bastion_port=bastion_port,
            local_port=self.local_port,
        )
        return listener

    def _session_factory(self) -> Callable[[str, int], Awaitable[asyncssh.SSHTCPSession[bytes]]]:
        if self._gate is not None:
            return self._gate.session_factory(self._conn)

        conn, local_port = self._conn, self.local_port

        async def forward(_orig_host: str, _orig_port: int) -> asyncssh.SSHTCPSession[bytes]:
            # The same forwarder that asyncssh's forward_remote_port hands out.
            forwarder = await conn.forward_connection("127.0.0.1", local_port)
            return cast(asyncssh.SSHTCPSession[bytes], forwarder)

        return forward

    async def _renew_until_failed(self) -> None:
        try:
            await self._renew_loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("route.lost", route=str(self.key), error=str(exc))
            raise

    async def _renew_loop(self) -> None:
        delay = self._lease_ttl / 3
        while True:
            await asyncio.sleep(delay)
            session_id = self.session.session_id

            try:
                await self._renew_or_register(session_id)
            except ProtocolMismatchError:
                raise
            except (ControlAPIError, TunnelError) as exc:
                if isinstance(exc, ControlAPIError) and exc.code == "route_taken":
                    raise
                if self._conn.is_closed():
                    raise TunnelError(
                        f"The SSH connection to the bastion closed, so the route {self.key} "
                        "is down until it reconnects."
                    ) from exc
                delay = self._retry_delay(exc, session_id)
                continue

            delay = self._lease_ttl / 3

    async def _renew_or_register(self, session_id: str) -> None:
        try:
            renewal = await self._control.renew(session_id)
        except ControlAPIError as exc:
            if exc.code != "session_not_found":
                raise
            log.warning("route.session_lost", route=str(self.key), session_id=session_id)
            await self._register_again()
            return

        self._lease_ttl = renewal.lease_ttl
        log.debug(
            "route.renewed",
            route=str(self.key),
            session_id=session_id,
            lease_expires_at=renewal.lease_expires_at,
        )

    def _retry_delay(self, error: Exception, session_id: str) -> float:
        # The bastion reaps the session once its lease expires. The next renewal then gets
        # session_not_found and registers again, so retrying forever heals the route.
        delay = min(RENEW_RETRY_DELAY, self._lease_ttl / 3)
        log.warning(
            "route.renew_failed",
            route=str(self.key),
            session_id=session_id,
            error=str(error),
            retry_in=delay,
        )
        return delay

    async def _register_again(self) -> None:
        old_port = self.session.port
        old_session_id = self.session.session_id

        # takeover=False: if someone else took the route meanwhile, that session wins.
        response = await self._register(preferred_port=old_port, takeover=False)
        log.info(
            "route.reregistered",
            route=str(self.key),
            old_session_id=old_session_id,
            session_id=response.session.session_id,
            old_bastion_port=old_port,
            bastion_port=response.session.port,
        )
        if response.session.port == old_port:
            return

        old_listener = self._listener
        try:
            self._listener = await self._forward_with_retries(response.session.port)
        except TunnelError:
            # A session without a forward only produces 502s. Giving it back makes the next
            # renewal get session_not_found and try again.
            await self._deregister()
            raise

        if old_listener is not None:
            old_listener.close()
            log.info("route.forward_closed", route=str(self.key), bastion_port=old_port)

    async def _deregister(self) -> None:
        if self._session is None:
            return
        session_id = self._session.session_id

        try:
            await self._control.deregister(session_id)
        except ControlAPIError as exc:
            if exc.code == "session_not_found":
                log.info("route.already_deregistered", route=str(self.key), session_id=session_id)
                return
            log.warning(
                "route.deregister_failed",
                route=str(self.key),
                session_id=session_id,
                error=str(exc),
            )
            return
        except TunnelError as exc:
            log.warning(
                "route.deregister_failed",
                route=str(self.key),
                session_id=session_id,
                error=str(exc),
            )
            return

        log.info("route.deregistered", route=str(self.key), session_id=session_id)

    async def _shutdown(self) -> None:
        try:
            if self._renew_task is not None:
                self._renew_task.cancel()
                await asyncio.wait([self._renew_task])

            if not self._abandoned:
                await self._deregister()

            if self._listener is not None:
                self._listener.close()
                await self._listener.wait_closed()
                log.info(
                    "route.forward_closed",
                    route=str(self.key),
                    bastion_port=self._listener.get_port(),
                )
        finally:
            self._closed.set()


class _PortBusyError(Exception):
    """The SSH server would not listen on a bastion port; *error* is the message for users."""

    error: TunnelError

    def __init__(self, error: TunnelError) -> None:
        super().__init__(str(error))
        self.error = error
