"""``serve-bastion``: the proxy, the control API, the lease reaper and, in dev mode, the
embedded SSH server, composed in one process around one session registry.

Start order is registry, proxy, control API, SSH server, reaper. Shutdown runs in reverse
order, so the registry closes after the last request that could change it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import attrs
import structlog
from aiohttp import web

from ephemwork.bastion.addresses import is_loopback_host
from ephemwork.bastion.connections import ConnectionLimits, guarded_protocol_factory
from ephemwork.bastion.control import create_control_app
from ephemwork.bastion.cors import OriginAllowlist
from ephemwork.bastion.ports import validate_port_range
from ephemwork.bastion.proxy import ProxyTimeouts, create_proxy_app
from ephemwork.bastion.registry import RegistryStorageError, SessionRegistry
from ephemwork.bastion.relay import RelayContext
from ephemwork.bastion.tunnel_connections import TunnelPool
from ephemwork.errors import UsageError

if TYPE_CHECKING:
    import asyncssh

    from ephemwork.bastion.sshserver import EmbeddedSSHServer

# Seconds between two passes of the lease reaper.
REAP_INTERVAL = 5.0

# Seconds that shutdown waits for requests in flight (long polls and event streams would
# otherwise hold it for aiohttp's default of 60 s).
SHUTDOWN_TIMEOUT = 5.0

logger = structlog.get_logger()


class BastionOptionsError(UsageError):
    """An option of ``serve-bastion`` is invalid, or an address cannot be listened on."""


@attrs.frozen
class BastionOptions:
    """The settings of ``serve-bastion``."""

    state_dir: Path
    listen: tuple[str, int] = ("0.0.0.0", 80)
    control_listen: tuple[str, int] = ("127.0.0.1", 7070)
    # A non-loopback control_listen is rejected unless this is True.
    allow_remote_control: bool = False
    port_range: tuple[int, int] = (20000, 20999)
    # Seconds a session stays routable without a renewal.
    lease_ttl: float = 60.0
    # Set: run the embedded SSH server on this loopback address (dev and local mode).
    ssh_listen: tuple[str, int] | None = None
    # Required when ssh_listen is set.
    authorized_keys: Path | None = None
    # None: a key generated once under state_dir.
    host_key: Path | None = None
    # None: the embedded SSH server accepts any user name.
    ssh_username: str | None = None
    proxy_timeouts: ProxyTimeouts = attrs.field(factory=ProxyTimeouts)
    connection_limits: ConnectionLimits = attrs.field(factory=ConnectionLimits)
    # Origin patterns whose CORS preflights for the route header are allowed.
    cors_allow_origins: tuple[str, ...] = ()
    reap_interval: float = REAP_INTERVAL


def validate_options(options: BastionOptions) -> None:
    """Raise `BastionOptionsError` naming the first invalid option and its fix."""
    addresses = {"listen": options.listen, "control_listen": options.control_listen}
    if options.ssh_listen is not None:
        addresses["ssh_listen"] = options.ssh_listen
    for name, (host, port) in addresses.items():
        if not host:
            raise BastionOptionsError(f"{name}: the host is empty; use an address like 127.0.0.1.")
        if not 0 <= port <= 65535:
            raise BastionOptionsError(f"{name}: port {port!r} is not between 0 and 65535.")

    control_host = options.control_listen[0]
    if not is_loopback_host(control_host) and not options.allow_remote_control:
        raise BastionOptionsError(
            f"The control API address {control_host!r} is not loopback, so anyone who can "
            "reach it could register routes. Use 127.0.0.1, or pass --allow-remote-control "
            "if the network in front of it is trusted."
        )

    try:
        low, high = validate_port_range(options.port_range)
    except ValueError as exc:
        raise BastionOptionsError(f"--port-range: {exc}.") from None

    for name, (_, port) in addresses.items():
        if port != 0 and low <= port <= high:
            raise BastionOptionsError(
                f"{name} port {port} is inside the tunnel port range {low}-{high}; "
                "move one of them."
            )

    limits = options.connection_limits
    timeouts = options.proxy_timeouts
    for name, seconds in (
        ("--header-timeout", limits.header_timeout),
        ("--keepalive-timeout", limits.keepalive_timeout),
        ("--connect-timeout", timeouts.connect),
        ("--websocket-idle-timeout", timeouts.websocket_idle),
    ):
        if seconds <= 0:
            raise BastionOptionsError(f"{name} must be positive seconds, got {seconds!r}.")
    if limits.max_per_client < 1:
        raise BastionOptionsError(
            f"--max-connections-per-client must be at least 1, got {limits.max_per_client!r}."
        )
    for pattern in options.cors_allow_origins:
        if "://" not in pattern:
            raise BastionOptionsError(
                f"--cors-allow-origin {pattern!r} is not an origin pattern; use "
                "scheme://host[:port], for example https://*.staging.example.com."
            )

    if options.lease_ttl <= 0:
        raise BastionOptionsError(f"lease_ttl must be positive seconds, got {options.lease_ttl!r}.")
    if options.reap_interval <= 0:
        raise BastionOptionsError(
            f"reap_interval must be positive seconds, got {options.reap_interval!r}."
        )

    if options.ssh_listen is not None:
        if not is_loopback_host(options.ssh_listen[0]):
            raise BastionOptionsError(
                f"The embedded SSH server address {options.ssh_listen[0]!r} is not loopback; "
                "it must never accept connections from a network. Use 127.0.0.1."
            )
        if options.authorized_keys is None:
            raise BastionOptionsError(
                "The embedded SSH server needs an authorized-keys file: pass --authorized-keys."
            )


class BastionServer:
    """The running bastion; use ``async with BastionServer(options) as server``."""

    options: BastionOptions
    registry: SessionRegistry | None
    _clock: Callable[[], float]
    _proxy_runner: web.AppRunner | None
    _proxy_listener: asyncio.Server | None
    _relay: RelayContext | None
    _control_runner: web.AppRunner | None
    _ssh_server: EmbeddedSSHServer | None
    _reaper: asyncio.Task[None] | None
    _closing: bool

    def __init__(self, options: BastionOptions, *, clock: Callable[[], float] = time.time) -> None:
        self.options = options
        self.registry = None
        self._clock = clock
        self._proxy_runner = None
        self._proxy_listener = None
        self._relay = None
        self._control_runner = None
        self._ssh_server = None
        self._reaper = None
        self._closing = False

    async def start(self) -> None:
        """Open the registry and start every listener and the reaper."""
        validate_options(self.options)
        try:
            await self._start()
        except BaseException:
            self.close()
            await self.wait_closed()
            raise

    async def _start(self) -> None:
        options = self.options
        self.registry = SessionRegistry.open(
            options.state_dir, port_range=options.port_range, lease_ttl=options.lease_ttl
        )

        self._proxy_runner = web.AppRunner(
            create_proxy_app(
                self.registry,
                timeouts=options.proxy_timeouts,
                cors=OriginAllowlist(options.cors_allow_origins),
            ),
            access_log=None,
            # A caller that disconnects cancels its request, which closes the tunnel side.
            handler_cancellation=True,
            keepalive_timeout=options.connection_limits.keepalive_timeout,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
        )
        await self._proxy_runner.setup()
        assert self._proxy_runner.server is not None
        timeouts = options.proxy_timeouts
        self._relay = RelayContext(
            routes=self.registry,
            timeouts=timeouts,
            pool=TunnelPool(
                asyncio.get_running_loop(),
                connect_timeout=timeouts.connect,
                read_timeout=timeouts.read,
                keepalive=timeouts.keepalive,
            ),
            keepalive_timeout=options.connection_limits.keepalive_timeout,
        )
        # The proxy's socket is opened here rather than by a TCPSite, so that each
        # connection goes through the guard that enforces the slow-client limits.
        try:
            self._proxy_listener = await asyncio.get_running_loop().create_server(
                guarded_protocol_factory(
                    self._proxy_runner.server, options.connection_limits, self._relay
                ),
                options.listen[0],
                options.listen[1],
                reuse_address=True,
            )
        except OSError as exc:
            raise BastionOptionsError(
                f"Cannot listen on {_format(options.listen)} (--listen): {_reason(exc)}. Pick "
                "a free port, or stop the process that holds it."
            ) from exc

        self._control_runner = web.AppRunner(
            create_control_app(self.registry, clock=self._clock),
            access_log=None,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
        )
        await _start_site(self._control_runner, options.control_listen, "control_listen")

        if options.ssh_listen is not None:
            # Imported only here: asyncssh adds about 15 MiB of RSS to a bastion behind OpenSSH.
            from ephemwork.bastion.sshserver import (
                EmbeddedSSHServer,
                ForwardPolicy,
                load_or_create_host_key,
            )

            assert options.authorized_keys is not None
            policy = ForwardPolicy(
                port_range=options.port_range,
                connect_ports=frozenset({self.control_address[1], self.proxy_address[1]}),
            )
            self._ssh_server = EmbeddedSSHServer(
                listen=options.ssh_listen,
                host_key=load_or_create_host_key(options.host_key, options.state_dir),
                authorized_keys=options.authorized_keys,
                policy=policy,
                username=options.ssh_username,
            )
            try:
                await self._ssh_server.start()
            except OSError as exc:
                raise BastionOptionsError(
                    f"Cannot listen on {_format(options.ssh_listen)} (--ssh-listen): "
                    f"{_reason(exc)}. Pick a free port, or 0 for any."
                ) from exc

        self._reaper = asyncio.create_task(self._reap_forever(), name="bastion-lease-reaper")

    @property
    def proxy_address(self) -> tuple[str, int]:
        """The address the proxy listens on, with the actual port."""
        if self._proxy_listener is None or not self._proxy_listener.sockets:
            raise RuntimeError("The bastion is not started: call start() first.")
        host, port = self._proxy_listener.sockets[0].getsockname()[:2]
        return (host, port)

    @property
    def control_address(self) -> tuple[str, int]:
        """The address the control API listens on, with the actual port."""
        return _bound_address(self._control_runner)

    @property
    def ssh_address(self) -> tuple[str, int]:
        """The address the embedded SSH server listens on; raises if it is not running."""
        if self._ssh_server is None:
            raise RuntimeError("The embedded SSH server is not running: set ssh_listen.")
        return self._ssh_server.address

    @property
    def host_public_key(self) -> asyncssh.SSHKey | None:
        """The embedded SSH server's public host key, or ``None`` without that server."""
        if self._ssh_server is None:
            return None
        return self._ssh_server.host_key.convert_to_public()

    def close(self) -> None:
        """Stop the reaper and the SSH server; `wait_closed` finishes the shutdown."""
        self._closing = True
        if self._proxy_listener is not None:
            self._proxy_listener.close()
        if self._reaper is not None:
            self._reaper.cancel()
        if self._ssh_server is not None:
            self._ssh_server.close()

    async def wait_closed(self) -> None:
        """Stop the HTTP listeners, wait for every part to stop, then close the registry."""
        if self._reaper is not None:
            try:
                await self._reaper
            except asyncio.CancelledError:
                # The reaper was cancelled by close(); re-raise only if we are cancelled too.
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
            self._reaper = None

        # The relay and aiohttp each finish the requests in progress on their own
        # connections, at the same time, so that shutdown takes one grace period.
        stopping = [
            runner.cleanup()
            for runner in (self._proxy_runner, self._control_runner)
            if runner is not None
        ]
        if self._relay is not None:
            stopping.append(self._relay.shutdown(SHUTDOWN_TIMEOUT))
        await asyncio.gather(*stopping)
        self._relay = None
        self._proxy_runner = self._control_runner = None
        if self._proxy_listener is not None:
            await self._proxy_listener.wait_closed()
            self._proxy_listener = None

        if self._ssh_server is not None:
            await self._ssh_server.wait_closed()
            self._ssh_server = None

        if self.registry is not None:
            self.registry.close()
            self.registry = None

    async def __aenter__(self) -> BastionServer:
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

    async def _reap_forever(self) -> None:
        while True:
            self.reap_expired()
            await asyncio.sleep(self.options.reap_interval)

    def reap_expired(self) -> int:
        """Remove the sessions whose lease has expired, log each, and return how many."""
        assert self.registry is not None
        try:
            expired = self.registry.expire(self._clock())
        except RegistryStorageError as exc:
            logger.error("bastion.reap_failed", error=str(exc))
            return 0

        for session in expired:
            logger.info(
                "bastion.session_expired",
                session_id=session.session_id,
                route=str(session.route),
                port=session.port,
                client=session.client,
            )
        return len(expired)


async def serve_bastion(options: BastionOptions) -> None:
    """Run the bastion until SIGINT or SIGTERM, then shut it down cleanly."""
    stop = asyncio.Event()
    received: list[str] = []
    loop = asyncio.get_running_loop()

    def request_stop(signum: signal.Signals) -> None:
        received.append(signum.name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, request_stop, signum)

    try:
        async with BastionServer(options) as server:
            assert server.registry is not None
            logger.info(
                "bastion.started",
                proxy=_format(server.proxy_address),
                control=_format(server.control_address),
                ssh=_format(server.ssh_address) if options.ssh_listen is not None else None,
                port_range=f"{options.port_range[0]}-{options.port_range[1]}",
                sessions=len(server.registry),
                state_dir=str(options.state_dir),
            )
            await stop.wait()
            logger.info("bastion.stopping", signal=received[0] if received else None)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)

    logger.info("bastion.stopped")


async def _start_site(runner: web.AppRunner, address: tuple[str, int], name: str) -> None:
    await runner.setup()
    site = web.TCPSite(runner, address[0], address[1])
    try:
        await site.start()
    except OSError as exc:
        raise BastionOptionsError(
            f"Cannot listen on {_format(address)} (--{name.replace('_', '-')}): {_reason(exc)}. "
            "Pick a free port, or stop the process that holds it."
        ) from exc


def _bound_address(runner: web.AppRunner | None) -> tuple[str, int]:
    if runner is None or not runner.addresses:
        raise RuntimeError("The bastion is not started: call start() first.")
    host, port = runner.addresses[0][:2]
    return (host, port)


def _format(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reason(exc: OSError) -> str:
    """Return the system's reason for *exc*, such as ``address already in use``.

    asyncio's own message repeats the address in tuple form before the reason.
    """
    if exc.errno:
        return os.strerror(exc.errno).lower()
    return str(exc)
