"""Local state of the laptop's sessions in ``<home>/state.json``.

``up`` records each route it serves, so that ``down`` and ``status`` in another terminal can
find the session and the process holding it. Home is ``$EPHEMWORK_HOME`` or
``~/.ephemwork``.

Every read-modify-write happens under an exclusive ``flock`` on ``<home>/state.lock``, and
every write replaces the file atomically. Concurrent ``up``, ``down`` and ``status`` calls
therefore never see a half-written file or lose each other's changes. A file that cannot be
parsed is moved aside with a warning, and the command continues with empty state.

The API is synchronous because each operation keeps the lock only for a small read, a
write and two fsync calls. Async callers may wrap calls in ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import cattrs
import click
import structlog

from ephemwork.client.processgroup import PROC_ROOT, PS_TIMEOUT
from ephemwork.errors import StateError
from ephemwork.home import HOME_ENV_VAR, ephemwork_home

log = structlog.get_logger()

STATE_FILE_NAME = "state.json"
LOCK_FILE_NAME = "state.lock"
STATE_FORMAT_VERSION = 1

# Seconds to wait for another ephemwork process to release the state lock.
LOCK_TIMEOUT = 10.0
_LOCK_POLL_INTERVAL = 0.05


@attrs.frozen
class BastionEndpoint:
    """The settings with which ``down`` and ``status`` reach a session's bastion themselves."""

    host: str
    port: int
    username: str
    # Private key files; empty means the SSH defaults (~/.ssh/id_*, the agent).
    identity_files: list[str]
    # A known_hosts file; None means ~/.ssh/known_hosts unless host_key is set.
    known_hosts: str | None
    # The one trusted host key as an OpenSSH public key line, for a bastion whose key is not
    # in any known_hosts file (the local-mode bastion generates a new one on every start).
    host_key: str | None
    control_port: int
    proxy_port: int
    # True for the local-mode bastion, which runs inside `up` and stops with it.
    in_process: bool = False


@attrs.frozen
class SessionRecord:
    """One route served by an ``ephemwork up`` process on this laptop."""

    user: str
    service: str
    local_port: int
    bastion_port: int
    session_id: str
    # The `ephemwork up` process that owns the tunnel.
    pid: int
    # Start time of that process, so a reused pid is not mistaken for it: clock ticks since
    # boot (/proc/<pid>/stat field 22), or epoch seconds from `ps` where there is no /proc.
    # None when neither could be read, and such a process is never signalled.
    pid_start_ticks: int | None
    # Seconds since the Unix epoch at which the session was recorded.
    started_at: float
    tunnel: str
    # Free-form lifecycle state set by the CLI, such as "starting", "serving", "reconnecting",
    # "dev_server_down" or "stop_requested" (set by `ephemwork down` for one service).
    state: str
    # The last problem `up` reported for this route, such as a dev server exit; "" if none.
    last_error: str = ""
    # The bastion of the session, or None for a tunnel that cannot be reached again without
    # `up` (ec2, whose SSH key exists only in that process).
    bastion: BastionEndpoint | None = None
    # The dev server's process group, the start time of its leader in clock ticks since boot,
    # and the value of EPHEMWORK_DEV_SERVER_ID in its environment. Together they let `down`
    # stop what a killed `up` left running without ever signalling a reused group id.
    dev_pgid: int | None = None
    dev_start_ticks: int | None = None
    dev_marker: str = ""

    @property
    def header_value(self) -> str:
        """The ``X-Ephemwork`` header value that selects this route."""
        return f"{self.user}:{self.service}"


@attrs.frozen
class _StateFile:
    version: int
    sessions: list[SessionRecord]


_converter = cattrs.Converter(forbid_extra_keys=True)


def default_home() -> Path:
    """Return ``$EPHEMWORK_HOME`` or ``~/.ephemwork``."""
    return ephemwork_home()


def process_start_ticks(pid: int) -> int | None:
    """Return the start time of *pid*, or None if unknown.

    On Linux it is in clock ticks since boot, from /proc. Where there is no /proc, as on
    macOS, it is in seconds since the Unix epoch, from ``ps -o lstart=``. Either way it only
    serves to compare with a value recorded earlier on the same laptop.
    """
    if not PROC_ROOT.is_dir():
        return _start_seconds_from_ps(pid)
    try:
        stat = (PROC_ROOT / str(pid) / "stat").read_text()
    except OSError:
        return None

    # The command name (field 2) is in parentheses and may itself contain spaces and
    # parentheses, so the fields are counted from the last closing parenthesis.
    fields_after_name = stat.rpartition(")")[2].split()
    try:
        return int(fields_after_name[19])
    except (IndexError, ValueError):
        return None


def _start_seconds_from_ps(pid: int) -> int | None:
    try:
        output = subprocess.run(
            ["ps", "-o", "lstart=", "-p", str(pid)],
            capture_output=True,
            text=True,
            timeout=PS_TIMEOUT,
            env={**os.environ, "LC_ALL": "C"},
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("state.ps_failed", pid=pid, error=str(exc))
        return None

    # Such as "Fri Dec  4 20:50:54 2026", in the C locale and local time.
    try:
        return int(time.mktime(time.strptime(" ".join(output.split()), "%a %b %d %H:%M:%S %Y")))
    except ValueError:
        return None


def is_process_alive(pid: int, start_ticks: int | None) -> bool:
    """Return whether *pid* runs and is provably the process recorded with *start_ticks*.

    Without *start_ticks* a live *pid* cannot be told apart from an unrelated process that
    got the same pid after a reboot, so it counts as not alive: callers then never signal it.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # The process exists but belongs to another user, so it is not our `up`.
        return False

    if _is_zombie(pid):
        # Killed but not yet reaped by its parent, such as an `up` killed with -9 whose
        # terminal or test harness has not waited for it.
        return False
    if start_ticks is None:
        return False
    return process_start_ticks(pid) == start_ticks


def unproven_process_runs(pid: int, start_ticks: int | None) -> bool:
    """Return whether *pid* runs but, without *start_ticks*, cannot be proven the recorded one."""
    if start_ticks is not None or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_zombie(pid: int) -> bool:
    try:
        stat = (PROC_ROOT / str(pid) / "stat").read_text()
    except OSError:
        return False
    fields_after_name = stat.rpartition(")")[2].split()
    return bool(fields_after_name) and fields_after_name[0] == "Z"


class StateStore:
    """The session records in ``<home>/state.json``, safe to use from several processes."""

    home: Path
    path: Path
    lock_path: Path
    lock_timeout: float

    def __init__(self, home: Path | None = None, *, lock_timeout: float = LOCK_TIMEOUT) -> None:
        self.home = home if home is not None else default_home()
        self.path = self.home / STATE_FILE_NAME
        self.lock_path = self.home / LOCK_FILE_NAME
        self.lock_timeout = lock_timeout

    def list_records(self) -> list[SessionRecord]:
        """Return every recorded session."""
        with self.transaction() as records:
            return list(records)

    def get(self, user: str, service: str) -> SessionRecord | None:
        """Return the record of ``user:service``, or None."""
        with self.transaction() as records:
            return _find(records, user, service)

    def add(self, record: SessionRecord) -> None:
        """Record *record*, replacing a stale record of the same route.

        Raises `StateError` if a live process other than this one serves the route.
        """
        with self.transaction() as records:
            existing = _find(records, record.user, record.service)
            if existing is not None:
                owner_alive = is_process_alive(existing.pid, existing.pid_start_ticks)
                if owner_alive and existing.pid != os.getpid():
                    raise StateError(
                        f"{existing.header_value} is already served by `ephemwork up` "
                        f"(pid {existing.pid}, tunnel {existing.tunnel!r}). Stop it with "
                        f"Ctrl-C in its terminal or `ephemwork down {existing.service}`."
                    )
                records.remove(existing)
            records.append(record)

    def update(self, user: str, service: str, **changes: Any) -> SessionRecord:
        """Change fields of the record of ``user:service`` and return the new record."""
        with self.transaction() as records:
            existing = _find(records, user, service)
            if existing is None:
                raise StateError(
                    f"No local session for {user}:{service} in {self.path}. Start one with "
                    f"`ephemwork up {service}`."
                )
            updated = attrs.evolve(existing, **changes)
            records[records.index(existing)] = updated
            return updated

    def remove(self, user: str, service: str) -> SessionRecord | None:
        """Delete the record of ``user:service`` and return it, or None if there was none."""
        with self.transaction() as records:
            existing = _find(records, user, service)
            if existing is not None:
                records.remove(existing)
            return existing

    def remove_stale(self) -> list[SessionRecord]:
        """Delete records whose ``up`` process is gone and return them."""
        with self.transaction() as records:
            stale = [r for r in records if not is_process_alive(r.pid, r.pid_start_ticks)]
            for record in stale:
                records.remove(record)
            return stale

    @contextlib.contextmanager
    def transaction(self) -> Iterator[list[SessionRecord]]:
        """Lock the state, yield its records as a list to edit, and save it if it changed."""
        self._ensure_home()
        with self._locked():
            records = self._read()
            original = list(records)
            yield records
            if records != original:
                self._write(records)

    def _ensure_home(self) -> None:
        if self.home.is_dir():
            return
        try:
            self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.home, 0o700)
        except OSError as exc:
            raise StateError(
                f"Cannot create the state folder {str(self.home)!r}: {exc.strerror}. "
                f"Set {HOME_ENV_VAR} to a writable folder."
            ) from exc
        log.info("state.home_created", home=str(self.home))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateError(
                f"Cannot open the state lock {str(self.lock_path)!r}: {exc.strerror}. "
                f"Check the permissions of {str(self.home)!r}."
            ) from exc

        try:
            self._acquire(fd)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _acquire(self, fd: int) -> None:
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise StateError(
                        f"Cannot lock {str(self.lock_path)!r}: {exc.strerror}."
                    ) from exc

            if time.monotonic() > deadline:
                raise StateError(
                    f"Another ephemwork process has held {str(self.lock_path)!r} for more than "
                    f"{self.lock_timeout:g}s. Check for a hung ephemwork process and stop it."
                )
            time.sleep(_LOCK_POLL_INTERVAL)

    def _read(self) -> list[SessionRecord]:
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StateError(
                f"Cannot read {str(self.path)!r}: {exc.strerror}. Check its permissions."
            ) from exc

        try:
            state = _converter.structure(json.loads(text), _StateFile)
        except (ValueError, TypeError, cattrs.BaseValidationError) as exc:
            self._move_aside(exc)
            return []

        if state.version != STATE_FORMAT_VERSION:
            self._move_aside(ValueError(f"unknown state format version {state.version}"))
            return []
        return state.sessions

    def _move_aside(self, problem: Exception) -> None:
        # Microseconds keep two corrupt files moved aside in the same second apart.
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        aside = self.path.with_name(f"{STATE_FILE_NAME}.corrupt-{stamp}")
        os.replace(self.path, aside)
        _fsync_folder(self.home)
        log.info(
            "state.corrupt_moved_aside",
            path=str(self.path),
            moved_to=str(aside),
            error=str(problem),
        )
        # A plain line rather than a log line, because every client command prints it and
        # the developer may want to look at the damaged file.
        click.echo(
            f"warning: the local state file {str(self.path)!r} is damaged ({problem}); moved "
            f"it to {str(aside)!r} and continued without it.",
            err=True,
        )

    def _write(self, records: list[SessionRecord]) -> None:
        data = json.dumps(
            _converter.unstructure(_StateFile(STATE_FORMAT_VERSION, records)), indent=2
        ).encode()
        temporary = self.path.with_name(f".{STATE_FILE_NAME}.{os.getpid()}.tmp")

        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, self.path)
            _fsync_folder(self.home)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise StateError(
                f"Cannot write {str(self.path)!r}: {exc.strerror}. Check free disk space and "
                "the folder's permissions."
            ) from exc


def _find(records: list[SessionRecord], user: str, service: str) -> SessionRecord | None:
    for record in records:
        if (record.user, record.service) == (user, service):
            return record
    return None


def _fsync_folder(folder: Path) -> None:
    # The rename is durable only once the folder entry itself is on disk.
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
