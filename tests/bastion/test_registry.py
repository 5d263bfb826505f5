"""Tests for the SQLite-backed session registry."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from ephemwork.bastion.registry import (
    REGISTRY_FILE_NAME,
    InvalidSessionRequestError,
    PortsExhaustedError,
    RegistryStorageError,
    RouteTakenError,
    SessionNotFoundError,
    SessionRegistry,
    TakeoverRefusedError,
)
from ephemwork.wire import RegisterRequest, RouteKey

RegistryFactory = Callable[..., SessionRegistry]


def request(
    user: str = "alice",
    service: str = "api",
    *,
    client: str = "laptop pid 1",
    preferred_port: int | None = None,
    takeover: bool = False,
    replaces_session_id: str | None = None,
) -> RegisterRequest:
    return RegisterRequest(
        user=user,
        service=service,
        client=client,
        preferred_port=preferred_port,
        takeover=takeover,
        replaces_session_id=replaces_session_id,
    )


class TestRegister:
    def test_session_fields(self, make_registry: RegistryFactory) -> None:
        """A new session gets the route, the client, the time and a lease of lease_ttl."""
        registry = make_registry(lease_ttl=30.0)
        session = registry.register(request(), now=1000.0)
        assert (session.user, session.service, session.client) == ("alice", "api", "laptop pid 1")
        assert session.registered_at == 1000.0
        assert session.lease_expires_at == 1030.0

    def test_first_port(self, make_registry: RegistryFactory) -> None:
        """The first session gets the lowest port of the range."""
        assert make_registry().register(request(), now=0.0).port == 20000

    def test_preferred_port(self, make_registry: RegistryFactory) -> None:
        """A free preferred port is honoured."""
        session = make_registry().register(request(preferred_port=20005), now=0.0)
        assert session.port == 20005

    def test_unique_ids(self, make_registry: RegistryFactory) -> None:
        """Session ids differ between sessions."""
        registry = make_registry()
        first = registry.register(request(service="a"), now=0.0)
        second = registry.register(request(service="b"), now=0.0)
        assert first.session_id != second.session_id

    def test_lookup(self, make_registry: RegistryFactory) -> None:
        """A registered route is found by lookup."""
        registry = make_registry()
        session = registry.register(request(), now=0.0)
        assert registry.lookup(RouteKey("alice", "api")) == session

    def test_lookup_unknown(self, make_registry: RegistryFactory) -> None:
        """An unknown route looks up to None."""
        assert make_registry().lookup(RouteKey("alice", "api")) is None

    def test_route_taken(self, make_registry: RegistryFactory) -> None:
        """A live route raises RouteTakenError naming the UTC time, the client and --takeover."""
        registry = make_registry()
        registry.register(request(client="host-a pid 7"), now=0.0)
        with pytest.raises(RouteTakenError) as caught:
            registry.register(request(client="host-b pid 8"), now=10.0)
        message = str(caught.value)
        assert "1970-01-01 00:00:00 UTC" in message
        assert "'host-a pid 7'" in message
        assert "ephemwork up --takeover" in message
        assert caught.value.code == "route_taken"

    def test_takeover(self, make_registry: RegistryFactory) -> None:
        """A takeover replaces the live session and frees its id."""
        registry = make_registry()
        old = registry.register(request(), now=0.0)
        new = registry.register(
            request(takeover=True, replaces_session_id=old.session_id), now=10.0
        )
        assert registry.lookup(RouteKey("alice", "api")) == new
        with pytest.raises(SessionNotFoundError):
            registry.renew(old.session_id, now=11.0)

    @pytest.mark.parametrize("replaces_session_id", [None, "", "guessed-id"])
    def test_takeover_without_id(
        self, make_registry: RegistryFactory, replaces_session_id: str | None
    ) -> None:
        """A takeover of a live session that does not name its id is refused."""
        registry = make_registry(lease_ttl=60.0)
        old = registry.register(request(client="host-a pid 7"), now=0.0)
        with pytest.raises(TakeoverRefusedError) as caught:
            registry.register(
                request(takeover=True, replaces_session_id=replaces_session_id), now=15.0
            )
        message = str(caught.value)
        assert "'host-a pid 7'" in message
        assert "wait 45 s" in message
        assert "ephemwork down api" in message
        assert caught.value.code == "route_taken"
        assert registry.lookup(RouteKey("alice", "api")) == old

    def test_takeover_expired_without_id(self, make_registry: RegistryFactory) -> None:
        """A takeover of a session past its lease needs no id."""
        registry = make_registry(lease_ttl=10.0)
        registry.register(request(), now=0.0)
        new = registry.register(request(takeover=True), now=10.0)
        assert registry.lookup(RouteKey("alice", "api")) == new

    def test_takeover_new_port(self, make_registry: RegistryFactory) -> None:
        """A takeover without a preference gets a new port, since the old forward may live on."""
        registry = make_registry()
        old = registry.register(request(), now=0.0)
        new = registry.register(
            request(takeover=True, replaces_session_id=old.session_id), now=10.0
        )
        assert new.port != old.port

    def test_takeover_keeps_requested_port(self, make_registry: RegistryFactory) -> None:
        """A takeover that prefers the old port gets it."""
        registry = make_registry()
        old = registry.register(request(), now=0.0)
        new = registry.register(
            request(takeover=True, preferred_port=old.port, replaces_session_id=old.session_id),
            now=10.0,
        )
        assert new.port == old.port

    def test_takeover_frees_old_port(self, make_registry: RegistryFactory) -> None:
        """The port of a replaced session is free again."""
        registry = make_registry(port_range=(20000, 20001))
        old = registry.register(request(), now=0.0)
        registry.register(request(takeover=True, replaces_session_id=old.session_id), now=10.0)
        assert registry.register(request(service="web"), now=10.0).port == 20000

    def test_expired_route_replaced(self, make_registry: RegistryFactory) -> None:
        """A route whose lease ended is replaced without takeover."""
        registry = make_registry(lease_ttl=10.0)
        registry.register(request(), now=0.0)
        new = registry.register(request(), now=10.0)
        assert registry.lookup(RouteKey("alice", "api")) == new

    def test_invalid_name(self, make_registry: RegistryFactory) -> None:
        """A user outside the name rule raises InvalidSessionRequestError."""
        with pytest.raises(InvalidSessionRequestError, match="Invalid user name 'Alice'"):
            make_registry().register(request(user="Alice"), now=0.0)

    def test_invalid_client(self, make_registry: RegistryFactory) -> None:
        """A client description with control characters is rejected."""
        with pytest.raises(InvalidSessionRequestError, match="client"):
            make_registry().register(request(client="x\n"), now=0.0)

    def test_exhausted(self, make_registry: RegistryFactory) -> None:
        """Registering beyond the range raises PortsExhaustedError."""
        registry = make_registry(port_range=(20000, 20000))
        registry.register(request(service="a"), now=0.0)
        with pytest.raises(PortsExhaustedError, match="1 active sessions"):
            registry.register(request(service="b"), now=0.0)


class TestRenewDeregister:
    def test_renew(self, make_registry: RegistryFactory) -> None:
        """A renewal moves the lease to now + lease_ttl."""
        registry = make_registry(lease_ttl=10.0)
        session = registry.register(request(), now=0.0)
        assert registry.renew(session.session_id, now=8.0).lease_expires_at == 18.0

    def test_renew_after_expiry_before_reap(self, make_registry: RegistryFactory) -> None:
        """A renewal between the lease end and the next reap still succeeds."""
        registry = make_registry(lease_ttl=10.0)
        session = registry.register(request(), now=0.0)
        assert registry.renew(session.session_id, now=15.0).lease_expires_at == 25.0

    def test_renew_unknown(self, make_registry: RegistryFactory) -> None:
        """Renewing an unknown id raises SessionNotFoundError with its code."""
        with pytest.raises(SessionNotFoundError) as caught:
            make_registry().renew("nope", now=0.0)
        assert caught.value.code == "session_not_found"

    def test_deregister(self, make_registry: RegistryFactory) -> None:
        """Deregistering removes the route and frees the port."""
        registry = make_registry(port_range=(20000, 20000))
        session = registry.register(request(), now=0.0)
        registry.deregister(session.session_id)
        assert registry.lookup(RouteKey("alice", "api")) is None
        assert registry.register(request(service="web"), now=0.0).port == 20000

    def test_deregister_unknown(self, make_registry: RegistryFactory) -> None:
        """Deregistering an unknown id raises SessionNotFoundError."""
        with pytest.raises(SessionNotFoundError, match="'nope'"):
            make_registry().deregister("nope")


class TestExpireList:
    def test_expire(self, make_registry: RegistryFactory) -> None:
        """Only sessions whose lease ended are removed and returned."""
        registry = make_registry(lease_ttl=10.0)
        old = registry.register(request(service="old"), now=0.0)
        young = registry.register(request(service="young"), now=5.0)
        assert registry.expire(now=12.0) == [old]
        assert registry.list() == [young]

    def test_expire_nothing(self, make_registry: RegistryFactory) -> None:
        """Nothing is removed while every lease runs."""
        registry = make_registry(lease_ttl=10.0)
        registry.register(request(), now=0.0)
        assert registry.expire(now=9.0) == []

    def test_list_by_user(self, make_registry: RegistryFactory) -> None:
        """list(user) returns only that user's sessions, ordered by service."""
        registry = make_registry()
        registry.register(request("bob", "web"), now=0.0)
        registry.register(request("alice", "web"), now=0.0)
        registry.register(request("alice", "api"), now=0.0)
        assert [s.service for s in registry.list("alice")] == ["api", "web"]


class TestPersistence:
    def test_reload(self, make_registry: RegistryFactory, tmp_path: Path) -> None:
        """A reopened registry has every session, its port held and its route routable."""
        first = make_registry(tmp_path / "s")
        alice = first.register(request("alice"), now=0.0)
        bob = first.register(request("bob"), now=0.0)
        first.deregister(bob.session_id)
        first.close()

        second = make_registry(tmp_path / "s")
        assert second.list() == [alice]
        assert second.lookup(alice.route) == alice
        assert second.register(request("carol"), now=0.0).port != alice.port

    def test_reload_renewal(self, make_registry: RegistryFactory, tmp_path: Path) -> None:
        """A reopened registry loads the renewed lease."""
        first = make_registry(tmp_path / "s", lease_ttl=10.0)
        session = first.register(request(), now=0.0)
        first.renew(session.session_id, now=50.0)
        first.close()
        assert make_registry(tmp_path / "s").list()[0].lease_expires_at == 60.0

    def test_reload_then_expire(self, make_registry: RegistryFactory, tmp_path: Path) -> None:
        """Sessions that expired while the bastion was down go on the first expire pass."""
        first = make_registry(tmp_path / "s", lease_ttl=10.0)
        session = first.register(request(), now=0.0)
        first.close()
        assert make_registry(tmp_path / "s").expire(now=100.0) == [session]

    def test_reload_narrower_range(self, make_registry: RegistryFactory, tmp_path: Path) -> None:
        """A session outside a narrowed range survives a reload."""
        first = make_registry(tmp_path / "s", port_range=(20000, 20009))
        session = first.register(request(preferred_port=20009), now=0.0)
        first.close()
        second = make_registry(tmp_path / "s", port_range=(20000, 20001))
        assert second.lookup(session.route) == session

    def test_pragmas(self, make_registry: RegistryFactory, tmp_path: Path) -> None:
        """The file uses a write-ahead log."""
        make_registry(tmp_path / "s").close()
        connection = sqlite3.connect(tmp_path / "s" / REGISTRY_FILE_NAME)
        try:
            assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            connection.close()

    def test_newer_schema(self, tmp_path: Path) -> None:
        """A file from a newer release raises RegistryStorageError naming the file."""
        (tmp_path / "s").mkdir()
        connection = sqlite3.connect(tmp_path / "s" / REGISTRY_FILE_NAME)
        connection.execute("PRAGMA user_version = 99")
        connection.close()
        with pytest.raises(RegistryStorageError, match="newer ephemwork"):
            SessionRegistry.open(tmp_path / "s", port_range=(20000, 20009), lease_ttl=60.0)

    def test_corrupt_file(self, tmp_path: Path) -> None:
        """A file that is not SQLite raises RegistryStorageError naming the file."""
        (tmp_path / "s").mkdir()
        (tmp_path / "s" / REGISTRY_FILE_NAME).write_bytes(b"not a database" * 200)
        with pytest.raises(RegistryStorageError, match=REGISTRY_FILE_NAME):
            SessionRegistry.open(tmp_path / "s", port_range=(20000, 20009), lease_ttl=60.0)


# Registers sessions as fast as it can and prints each id once register() has returned.
_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import structlog
    from ephemwork.bastion.registry import SessionRegistry
    from ephemwork.wire import RegisterRequest

    # Logs go to stderr so that stdout has only the committed ids.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    registry = SessionRegistry.open(
        Path(sys.argv[1]), port_range=(20000, 29999), lease_ttl=60.0
    )
    for index in range(10000):
        request = RegisterRequest(user="u", service=f"s{index}", client="crash test")
        session = registry.register(request, now=0.0)
        if index % 3 == 2:
            registry.deregister(session.session_id)
            print("removed", session.session_id, flush=True)
        else:
            print("added", session.session_id, flush=True)
    """
)


class TestCrashSafety:
    def test_sigkill_mid_write(self, tmp_path: Path) -> None:
        """After a SIGKILL during writes, every committed change is there and nothing else."""
        state_dir = tmp_path / "s"
        process = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(state_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        assert process.stdout is not None
        lines: list[str] = []
        while len(lines) < 60:
            lines.append(process.stdout.readline())
        process.send_signal(signal.SIGKILL)
        process.wait()

        # Lines printed after the 60th were committed too, just not read yet.
        lines += process.stdout.read().splitlines()
        process.stdout.close()
        committed: dict[str, str] = {}
        for line in lines:
            action, _, session_id = line.strip().partition(" ")
            if action in ("added", "removed"):
                committed[session_id] = action

        registry = SessionRegistry.open(state_dir, port_range=(20000, 29999), lease_ttl=60.0)
        try:
            ids = {session.session_id for session in registry.list()}
        finally:
            registry.close()

        added = {sid for sid, action in committed.items() if action == "added"}
        removed = {sid for sid, action in committed.items() if action == "removed"}
        assert added <= ids
        assert not removed & ids
        # At most the one register() in flight when the kill arrived may be extra.
        assert len(ids - added) <= 1

    def test_integrity_after_kill(self, tmp_path: Path) -> None:
        """The database passes SQLite's integrity check after a SIGKILL."""
        state_dir = tmp_path / "s"
        process = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(state_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        assert process.stdout is not None
        for _ in range(30):
            process.stdout.readline()
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdout.close()

        connection = sqlite3.connect(state_dir / REGISTRY_FILE_NAME)
        try:
            assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            connection.close()
