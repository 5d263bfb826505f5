"""The session registry: live routes in memory, persisted in SQLite under the state folder.

Request handling reads only the in-memory maps. Every change is committed to
``<state_dir>/registry.sqlite3`` (write-ahead log, ``synchronous=FULL``) before the maps
change, so a process killed at any moment restarts with every committed session and never
with a half-written one.
"""

from __future__ import annotations

import builtins
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

import attrs
import structlog

from ephemwork.bastion.ports import PortAllocator, PortsExhaustedError, has_no_listener
from ephemwork.errors import EphemworkError, OperationError, UsageError
from ephemwork.identity import NAME_RULE, is_valid_name
from ephemwork.wire import RegisterRequest, RouteKey, Session

__all__ = [
    "REGISTRY_FILE_NAME",
    "InvalidSessionRequestError",
    "PortsExhaustedError",
    "RegistryError",
    "RegistryStorageError",
    "RouteTakenError",
    "SessionNotFoundError",
    "SessionRegistry",
    "TakeoverRefusedError",
]

REGISTRY_FILE_NAME = "registry.sqlite3"

# Stored in PRAGMA user_version; raise it when the table layout changes.
SCHEMA_VERSION = 1

# The `client` field is shown to other users in error messages and logs, so keep it short.
MAX_CLIENT_LENGTH = 200

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    service TEXT NOT NULL,
    port INTEGER NOT NULL UNIQUE,
    client TEXT NOT NULL,
    registered_at REAL NOT NULL,
    lease_expires_at REAL NOT NULL,
    UNIQUE (user, service)
)
"""

_COLUMNS = "session_id, user, service, port, client, registered_at, lease_expires_at"

logger = structlog.get_logger()


class RegistryError(EphemworkError):
    """A registry operation was rejected; `code` is the control API's error code."""

    code: str = "registry_error"


class InvalidSessionRequestError(RegistryError, UsageError):
    """A register request carries an invalid user, service or client."""

    code = "invalid_request"


class RouteTakenError(RegistryError, UsageError):
    """Another live session already serves the requested route."""

    code = "route_taken"

    def __init__(self, message: str, *, existing: Session) -> None:
        super().__init__(message)
        self.existing = existing


class TakeoverRefusedError(RouteTakenError):
    """A takeover of a live session did not name that session's id.

    It keeps the ``route_taken`` code, so laptops that stop on that code stop here too.
    """


class SessionNotFoundError(RegistryError, UsageError):
    """No session has the given id: it was deregistered, taken over or reaped."""

    code = "session_not_found"


class RegistryStorageError(RegistryError, OperationError):
    """The SQLite file cannot be opened, read or written."""

    code = "storage_error"


class SessionRegistry:
    """The live sessions of this bastion, keyed by session id and by route.

    Operations take the current time as an argument so that callers (and tests) own the
    clock. A session stays routable until `expire` removes it, even past its lease, so a
    renewal that arrives between the expiry and the next reaping pass still succeeds.
    """

    path: Path
    lease_ttl: float
    _connection: sqlite3.Connection
    _ports: PortAllocator
    _by_id: dict[str, Session]
    _by_route: dict[RouteKey, Session]

    def __init__(
        self,
        path: Path,
        *,
        port_range: tuple[int, int],
        lease_ttl: float,
        port_is_free: Callable[[int], bool] = has_no_listener,
    ) -> None:
        if lease_ttl <= 0:
            raise ValueError(f"lease_ttl must be positive, got {lease_ttl!r}")

        self.path = path
        self.lease_ttl = lease_ttl
        self._ports = PortAllocator(port_range, is_free=port_is_free)
        self._by_id = {}
        self._by_route = {}

        try:
            self._connection = _open_database(path)
            sessions = self._read_sessions()
        except sqlite3.Error as exc:
            raise RegistryStorageError(
                f"Cannot open the session registry {str(path)!r}: {exc}. Check the file's "
                "permissions, or move it away to start with no sessions."
            ) from exc

        for session in sessions:
            self._ports.reserve(session.port)
            self._by_id[session.session_id] = session
            self._by_route[session.route] = session

        logger.info("registry.loaded", path=str(path), sessions=len(sessions))

    @classmethod
    def open(
        cls,
        state_dir: Path,
        *,
        port_range: tuple[int, int],
        lease_ttl: float,
        port_is_free: Callable[[int], bool] = has_no_listener,
    ) -> SessionRegistry:
        """Open (creating if needed) the registry file inside *state_dir*."""
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryStorageError(
                f"Cannot create the state folder {str(state_dir)!r}: {exc}."
            ) from exc
        return cls(
            state_dir / REGISTRY_FILE_NAME,
            port_range=port_range,
            lease_ttl=lease_ttl,
            port_is_free=port_is_free,
        )

    @property
    def port_range(self) -> tuple[int, int]:
        """The inclusive range tunnel ports are allocated from."""
        return (self._ports.low, self._ports.high)

    def __len__(self) -> int:
        return len(self._by_id)

    def lookup(self, route: RouteKey) -> Session | None:
        """Return the session serving *route*, without touching the disk."""
        return self._by_route.get(route)

    def get(self, session_id: str) -> Session:
        """Return the session with *session_id*, or raise `SessionNotFoundError`."""
        try:
            return self._by_id[session_id]
        except KeyError:
            raise SessionNotFoundError(
                f"No session {session_id!r} on this bastion: it was stopped, taken over or "
                "expired. Run `ephemwork up` again to register a new one."
            ) from None

    def register(self, request: RegisterRequest, now: float) -> Session:
        """Create a session for the request's route and allocate its tunnel port.

        A live session on the same route raises `RouteTakenError`, unless the request sets
        ``takeover`` and names that session in ``replaces_session_id``; a takeover that does
        not name it raises `TakeoverRefusedError`. The id is the proof: list responses leave
        it out, so only the laptop that registered the session holds it. A session whose
        lease has expired is replaced silently.
        """
        route = _validated_route(request)
        existing = self._by_route.get(route)
        if existing is not None and existing.lease_expires_at > now:
            if not request.takeover:
                raise RouteTakenError(_route_taken_message(existing), existing=existing)
            if not _names_session(request.replaces_session_id, existing):
                raise TakeoverRefusedError(
                    _takeover_refused_message(existing, now), existing=existing
                )

        port = self._allocate_port(request.preferred_port, existing)
        session = Session(
            session_id=secrets.token_urlsafe(18),
            user=route.user,
            service=route.service,
            port=port,
            client=request.client,
            registered_at=now,
            lease_expires_at=now + self.lease_ttl,
        )

        try:
            with self._transaction() as cursor:
                if existing is not None:
                    cursor.execute(
                        "DELETE FROM sessions WHERE session_id = ?", (existing.session_id,)
                    )
                cursor.execute(
                    f"INSERT INTO sessions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    attrs.astuple(session),
                )
        except RegistryStorageError:
            if existing is None or port != existing.port:
                self._ports.release(port)
            raise

        if existing is not None:
            del self._by_id[existing.session_id]
            if existing.port != port:
                self._ports.release(existing.port)
            logger.info(
                "registry.session_replaced",
                session_id=existing.session_id,
                route=str(route),
                port=existing.port,
                client=existing.client,
                replaced_by=session.session_id,
                reason="takeover" if existing.lease_expires_at > now else "lease_expired",
            )

        self._by_id[session.session_id] = session
        self._by_route[route] = session
        return session

    def renew(self, session_id: str, now: float) -> Session:
        """Extend the lease of *session_id* to ``now + lease_ttl``."""
        session = self.get(session_id)
        renewed = attrs.evolve(session, lease_expires_at=now + self.lease_ttl)

        with self._transaction() as cursor:
            cursor.execute(
                "UPDATE sessions SET lease_expires_at = ? WHERE session_id = ?",
                (renewed.lease_expires_at, session_id),
            )

        self._by_id[session_id] = renewed
        self._by_route[renewed.route] = renewed
        return renewed

    def deregister(self, session_id: str) -> Session:
        """Remove *session_id* and free its port; return the removed session."""
        session = self.get(session_id)

        with self._transaction() as cursor:
            cursor.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))

        self._forget(session)
        return session

    def expire(self, now: float) -> builtins.list[Session]:
        """Remove every session whose lease ended at or before *now*; return them."""
        expired = [s for s in self._by_id.values() if s.lease_expires_at <= now]
        if not expired:
            return []

        with self._transaction() as cursor:
            cursor.executemany(
                "DELETE FROM sessions WHERE session_id = ?",
                [(session.session_id,) for session in expired],
            )

        for session in expired:
            self._forget(session)
        return expired

    def list(self, user: str | None = None) -> builtins.list[Session]:
        """Return the sessions, of *user* only when given, ordered by route."""
        sessions = [s for s in self._by_id.values() if user is None or s.user == user]
        return sorted(sessions, key=lambda s: (s.user, s.service))

    def close(self) -> None:
        """Close the SQLite connection; every change is already committed."""
        self._connection.close()

    async def wait_closed(self) -> None:
        """Return at once: `close` releases everything synchronously."""

    def __enter__(self) -> SessionRegistry:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> SessionRegistry:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()

    def _allocate_port(self, preferred: int | None, existing: Session | None) -> int:
        # A takeover keeps the old port only when the laptop requests it, because the old
        # laptop's forward may still be bound to that port and the new forward would fail.
        if existing is not None and preferred == existing.port:
            return existing.port

        try:
            return self._ports.allocate(preferred)
        except PortsExhaustedError:
            if existing is not None:
                return existing.port
            raise

    def _forget(self, session: Session) -> None:
        del self._by_id[session.session_id]
        if self._by_route.get(session.route) == session:
            del self._by_route[session.route]
        self._ports.release(session.port)

    def _read_sessions(self) -> builtins.list[Session]:
        rows = self._connection.execute(f"SELECT {_COLUMNS} FROM sessions").fetchall()
        return [Session(*row) for row in rows]

    # NOTE: each commit waits for fsync on the event loop thread. Control API calls are a
    # few per session per lease period, so this stays short, but a slow disk delays proxying.
    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        cursor = self._connection.cursor()
        try:
            cursor.execute("BEGIN IMMEDIATE")
            yield cursor
            cursor.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._connection.in_transaction:
                self._connection.rollback()
            logger.error("registry.write_failed", path=str(self.path), error=str(exc))
            raise RegistryStorageError(
                f"Cannot write the session registry {str(self.path)!r}: {exc}."
            ) from exc
        finally:
            cursor.close()


def _open_database(path: Path) -> sqlite3.Connection:
    # isolation_level=None leaves transactions to the explicit BEGIN/COMMIT in _transaction.
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode = WAL")
        # FULL syncs the write-ahead log on every commit, so a committed session survives
        # a power loss as well as a kill -9.
        connection.execute("PRAGMA synchronous = FULL")

        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"it was written by a newer ephemwork (schema version {version}, this "
                f"release reads {SCHEMA_VERSION})"
            )
        connection.execute(_SCHEMA)
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        connection.close()
        raise
    return connection


def _validated_route(request: RegisterRequest) -> RouteKey:
    for kind, value in (("user", request.user), ("service", request.service)):
        if not is_valid_name(value):
            raise InvalidSessionRequestError(f"Invalid {kind} name {value!r}: use {NAME_RULE}.")

    if len(request.client) > MAX_CLIENT_LENGTH or not request.client.isprintable():
        raise InvalidSessionRequestError(
            f"Invalid client description {request.client[:40]!r}: use at most "
            f"{MAX_CLIENT_LENGTH} printable characters."
        )

    return RouteKey(request.user, request.service)


def _names_session(session_id: str | None, session: Session) -> bool:
    if not session_id:
        return False
    return secrets.compare_digest(session_id.encode(), session.session_id.encode())


def _takeover_refused_message(existing: Session, now: float) -> str:
    registered = datetime.fromtimestamp(existing.registered_at, tz=UTC)
    return (
        f"Cannot take over route {str(existing.route)!r}: it is live, registered at "
        f"{registered:%Y-%m-%d %H:%M:%S} UTC from {existing.client!r}, and a takeover must "
        "name that session's id, which only the laptop that registered it holds. Stop that "
        f"`ephemwork up` (`ephemwork down {existing.service}` on that laptop), or, if it is "
        f"no longer running, wait {existing.lease_expires_at - now:.0f} s until its lease "
        "expires and run `ephemwork up` again."
    )


def _route_taken_message(existing: Session) -> str:
    registered = datetime.fromtimestamp(existing.registered_at, tz=UTC)
    return (
        f"Route {str(existing.route)!r} is already live: it was registered at "
        f"{registered:%Y-%m-%d %H:%M:%S} UTC from {existing.client!r}. Stop that session "
        "with `ephemwork down`, or run `ephemwork up --takeover` to replace it."
    )
