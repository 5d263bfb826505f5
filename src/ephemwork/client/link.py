"""The SSH connection to the bastion, kept up for as long as ``up`` runs, and its routes.

A `Link` owns one SSH connection at a time and one `Route` per service on it. asyncssh's
keepalives (every 5 s, 3 unanswered) or a reset close a broken connection within about
15 s. `Link.run` then:

1. reports the loss once through *notify*, and leaves each route's session on the bastion;
2. connects again with capped exponential backoff and jitter (0.25 s doubling up to 3 s),
   so the route is back within a few seconds of the bastion becoming reachable;
3. opens each route again with its previous session, which keeps the bastion port when it
   is still free (`Route.open` renews it, or registers again asking for the same port);
4. reports each route that is back.

Every error of the new connection is retried, including an ec2 key push that fails
because the network is still down, except the two that retrying cannot fix: the route was
taken over, or the bastion speaks another protocol version.

``ephemwork down SERVICE`` may remove a route at any point of this. A route that finishes
opening after its removal is closed again, and the abandoned session of a removed route is
deregistered as soon as a connection is up.

The dev servers are not touched: they keep running through all of this.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import asyncssh
import attrs
import structlog

from ephemwork.client.backoff import Backoff
from ephemwork.client.control import ControlClient
from ephemwork.client.forwarding import ServiceGate
from ephemwork.client.tunnel import Route, TunnelTarget, connect
from ephemwork.errors import (
    ControlAPIError,
    EphemworkError,
    ProtocolMismatchError,
    TunnelError,
)
from ephemwork.wire import RouteKey, Session

log = structlog.get_logger()

RECONNECT_BASE = 0.25
RECONNECT_CAP = 3.0

# Seconds between deregistering the routes and closing the SSH connection, so responses
# to requests that the bastion forwarded just before deregistration are not cut off.
DRAIN_SECONDS = 0.5


@attrs.define
class _RouteSpec:
    key: RouteKey
    local_port: int
    gate: ServiceGate | None
    # The session of a previous `up` that --takeover replaces, as proof for the bastion.
    replaces_session_id: str | None = None
    session: Session | None = None


class _LossWatcher(asyncssh.SSHClient):
    """Keeps the reason the SSH connection was lost, for the message to the developer."""

    reason: str | None

    def __init__(self) -> None:
        self.reason = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.reason = str(exc) if exc is not None else "closed by the server"


class Link:
    """One SSH connection to the bastion at a time, and the routes held through it."""

    target: TunnelTarget
    _client: str
    _takeover: bool
    _notify: Callable[[str], None]
    _on_session: Callable[[RouteKey, Session], None]
    _on_lost: Callable[[str], None]
    _conn: asyncssh.SSHClientConnection | None
    _watcher: _LossWatcher | None
    _specs: dict[RouteKey, _RouteSpec]
    _routes: dict[RouteKey, Route]
    # Sessions of removed routes that had no live Route to deregister them, because the
    # connection was down; the next connection deregisters them.
    _orphans: list[tuple[RouteKey, Session]]
    _routes_changed: asyncio.Event
    _backoff: Backoff

    def __init__(
        self,
        target: TunnelTarget,
        client: str,
        *,
        takeover: bool = False,
        notify: Callable[[str], None] = print,
        on_session: Callable[[RouteKey, Session], None] = lambda key, session: None,
        on_lost: Callable[[str], None] = lambda problem: None,
    ) -> None:
        self.target = target
        self._client = client
        self._takeover = takeover
        self._notify = notify
        self._on_session = on_session
        self._on_lost = on_lost
        self._conn = None
        self._watcher = None
        self._specs = {}
        self._routes = {}
        self._orphans = []
        self._routes_changed = asyncio.Event()
        self._backoff = Backoff(RECONNECT_BASE, RECONNECT_CAP)

    @property
    def connected(self) -> bool:
        """Whether the SSH connection is currently up."""
        return self._conn is not None and not self._conn.is_closed()

    def session(self, key: RouteKey) -> Session | None:
        """The last session the bastion gave *key*, or None."""
        spec = self._specs.get(key)
        return spec.session if spec is not None else None

    async def connect(self) -> None:
        """Open the first SSH connection; raise `TunnelError` if the bastion cannot be reached."""
        self._conn = await self._open_connection()

    async def add_route(
        self,
        key: RouteKey,
        local_port: int,
        gate: ServiceGate | None = None,
        *,
        replaces_session_id: str | None = None,
    ) -> Session:
        """Register *key* and open its reverse forward to *local_port* on this laptop.

        With ``takeover``, *replaces_session_id* names the live session being replaced.
        """
        spec = _RouteSpec(key, local_port, gate, replaces_session_id)
        self._specs[key] = spec
        try:
            await self._open_route(spec, takeover=self._takeover)
        except BaseException:
            del self._specs[key]
            raise
        assert spec.session is not None
        return spec.session

    async def remove_route(self, key: RouteKey) -> None:
        """Deregister *key* and close its forward; the other routes stay.

        During a reconnect *key* may have no live `Route`: its session is then deregistered
        directly, or by the next connection when none is up.
        """
        spec = self._specs.pop(key, None)
        route = self._routes.pop(key, None)
        self._routes_changed.set()
        if route is not None:
            route.close()
            await route.wait_closed()
            return

        if spec is None or spec.session is None:
            return
        log.info("link.route_removed_without_route", route=str(key), connected=self.connected)
        if self.connected:
            await self._deregister_session(key, spec.session)
        else:
            self._orphans.append((key, spec.session))

    async def run(self) -> None:
        """Hold the routes, reconnecting after every lost connection; return never.

        Raises the errors that reconnecting cannot fix: the route was taken over by another
        session, or the bastion speaks another protocol version.
        """
        while True:
            await self._wait_lost()

            reason = self._watcher.reason if self._watcher is not None else None
            lost_at = time.monotonic()
            log.warning("link.lost", target=self.target.description, reason=reason)
            self._notify(
                f"Lost the SSH connection to {self.target.description} ({reason or 'closed'}); "
                "reconnecting. The dev servers keep running."
            )
            self._on_lost(f"SSH connection lost ({reason or 'closed'})")
            await self._abandon_routes()

            await self._reconnect()

            elapsed = time.monotonic() - lost_at
            for spec in self._specs.values():
                assert spec.session is not None
                self._notify(
                    f"{spec.key} is routed again through bastion port {spec.session.port} "
                    f"(connection restored after {elapsed:.1f}s)."
                )

    def close(self) -> None:
        """Close the SSH connection at once, without deregistering; see `aclose`."""
        if self._conn is not None:
            self._conn.close()

    async def aclose(self) -> None:
        """Deregister every route, let in-flight responses drain, then close the connection."""
        routes = list(self._routes.values())
        self._routes.clear()
        for route in routes:
            route.close()
        for route in routes:
            await route.wait_closed()

        if self._conn is not None and not self._conn.is_closed():
            if routes:
                await asyncio.sleep(DRAIN_SECONDS)
            self._conn.close()
        if self._conn is not None:
            await self._conn.wait_closed()

    async def _open_connection(self) -> asyncssh.SSHClientConnection:
        watcher = _LossWatcher()
        conn = await connect(self.target, client_factory=lambda: watcher)
        self._watcher = watcher
        return conn

    async def _open_route(self, spec: _RouteSpec, *, takeover: bool) -> None:
        assert self._conn is not None
        control = ControlClient(self._conn, self.target.control_port)
        route = Route(
            self._conn,
            control,
            spec.key,
            spec.local_port,
            self._client,
            takeover=takeover,
            replaces_session_id=spec.replaces_session_id,
            gate=spec.gate,
        )
        session = await route.open(previous=spec.session)
        spec.session = session
        if self._specs.get(spec.key) is not spec:
            # remove_route ran while open() waited on the bastion, and found no Route to close.
            log.info(
                "link.route_removed_while_opening",
                route=str(spec.key),
                session_id=session.session_id,
            )
            route.close()
            await route.wait_closed()
            return
        self._routes[spec.key] = route
        self._routes_changed.set()
        self._on_session(spec.key, session)

    async def _wait_lost(self) -> None:
        """Return when the connection is lost; raise a route's error that cannot heal."""
        assert self._conn is not None
        while True:
            self._routes_changed.clear()
            waiters: dict[asyncio.Task[object], Route | None] = {
                asyncio.create_task(self._conn.wait_closed(), name="ephemwork-link-closed"): None,
                asyncio.create_task(
                    self._routes_changed.wait(), name="ephemwork-link-routes-changed"
                ): None,
            }
            for route in self._routes.values():
                watcher = asyncio.create_task(
                    route.wait_lost(), name=f"ephemwork-watch-{route.key}"
                )
                waiters[watcher] = route

            try:
                done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in waiters:
                    task.cancel()
                await asyncio.gather(*waiters, return_exceptions=True)

            if self._conn.is_closed():
                return
            for task in done:
                if waiters[task] is None or task.cancelled():
                    continue
                error = task.exception()
                if error is not None and not isinstance(error, TunnelError):
                    raise error
                # A route whose renewals failed while the connection still looks up means
                # the connection is broken; closing it lets the next pass reconnect.
                if error is not None:
                    self._conn.close()

    async def _abandon_routes(self) -> None:
        routes = list(self._routes.values())
        self._routes.clear()
        for route in routes:
            route.abandon()
        for route in routes:
            await route.wait_closed()

    async def _reconnect(self) -> None:
        self._backoff.reset()
        last_problem = None
        while True:
            try:
                self._conn = await self._open_connection()
                await self._deregister_orphans()
                for spec in list(self._specs.values()):
                    # remove_route may have dropped it while an earlier route was opening.
                    if self._specs.get(spec.key) is spec:
                        await self._open_route(spec, takeover=False)
            except ProtocolMismatchError:
                raise
            except EphemworkError as exc:
                # Any other error may be the network still coming back: an ec2 key push
                # (AwsSetupError, AwsError) fails the same way as the SSH handshake.
                if isinstance(exc, ControlAPIError) and exc.code == "route_taken":
                    raise
                await self._abandon_routes()
                if self._conn is not None:
                    self._conn.close()
                delay = self._backoff.next_delay()
                self._log_retry(exc, delay)
                if str(exc) != last_problem:
                    last_problem = str(exc)
                    self._notify(
                        f"Reconnecting to {self.target.description} failed: {exc} Retrying."
                    )
                await asyncio.sleep(delay)
                continue

            log.info(
                "link.reconnected",
                target=self.target.description,
                attempts=self._backoff.attempts + 1,
            )
            return

    async def _deregister_orphans(self) -> None:
        orphans, self._orphans = self._orphans, []
        for key, session in orphans:
            await self._deregister_session(key, session)

    async def _deregister_session(self, key: RouteKey, session: Session) -> None:
        """Deregister a removed route's *session*; a failure is logged, the lease expires it."""
        assert self._conn is not None
        control = ControlClient(self._conn, self.target.control_port)
        try:
            await control.deregister(session.session_id)
        except (ControlAPIError, TunnelError) as exc:
            log.warning(
                "link.deregister_failed",
                route=str(key),
                session_id=session.session_id,
                error=str(exc),
            )
            return
        log.info("link.deregistered", route=str(key), session_id=session.session_id)

    def _log_retry(self, error: Exception, delay: float) -> None:
        attempt = self._backoff.attempts
        # Attempts 1, 2, 4, 8, ... and then every 100th, so hours of sleep log a few lines.
        if attempt & (attempt - 1) == 0 or attempt % 100 == 0:
            log.info(
                "link.reconnect_failed",
                target=self.target.description,
                attempt=attempt,
                error_type=type(error).__name__,
                error=str(error),
                retry_in=round(delay, 2),
            )


async def close_quietly(link: Link) -> None:
    """Close *link* on shutdown; a connection that breaks while closing is only logged."""
    try:
        await link.aclose()
    except (TunnelError, ControlAPIError, asyncssh.Error, OSError) as exc:
        log.warning("link.close_failed", target=link.target.description, error=str(exc))
        link.close()
