"""The messages of the control API, as attrs classes."""

from __future__ import annotations

import attrs


@attrs.frozen
class RouteKey:
    """The ``user:service`` pair that a route header names."""

    user: str
    service: str

    @property
    def header_value(self) -> str:
        """The value of the ``X-Ephemwork`` header that selects this route."""
        return f"{self.user}:{self.service}"

    def __str__(self) -> str:
        return self.header_value


@attrs.frozen
class RegisterRequest:
    """A laptop asks for a tunnel port for ``user:service``."""

    user: str
    service: str
    # Free-form description of the laptop side (host name and process id) shown to
    # whoever meets this session later, for example in a takeover refusal.
    client: str
    # The port the laptop held before a reconnect; the bastion reuses it when it is free.
    preferred_port: int | None = None
    takeover: bool = False
    # With ``takeover``: the id of the live session to replace, which proves that this
    # laptop registered it. The bastion rejects a takeover of a live session without it.
    replaces_session_id: str | None = None


@attrs.frozen
class Session:
    """A live route: ``user:service`` served through ``port`` on the bastion's loopback."""

    # The secret that renews, deregisters and takes over this session. Only the register
    # response carries it; sessions in a `SessionList` have "" here.
    session_id: str
    user: str
    service: str
    port: int
    client: str
    # Seconds since the Unix epoch.
    registered_at: float
    lease_expires_at: float

    @property
    def route(self) -> RouteKey:
        """The route key this session serves."""
        return RouteKey(self.user, self.service)


@attrs.frozen
class RegisterResponse:
    """The bastion's answer to a `RegisterRequest`."""

    session: Session
    # Seconds a session stays live without a renewal.
    lease_ttl: float


@attrs.frozen
class LeaseRenewal:
    """The bastion's answer to a lease renewal: the session's new expiry."""

    session_id: str
    lease_expires_at: float
    lease_ttl: float


@attrs.frozen
class SessionList:
    """The sessions the bastion holds, optionally filtered by user."""

    sessions: list[Session]


@attrs.frozen
class ErrorBody:
    """An error from the control API: a stable code for programs, a sentence for people."""

    code: str
    message: str
