"""``ephemwork down``: stop running ``up`` processes from another terminal."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

import click
import structlog

from ephemwork.client.stale import clean_stale_record
from ephemwork.client.state import (
    SessionRecord,
    StateStore,
    is_process_alive,
    unproven_process_runs,
)
from ephemwork.commands.stop import DOWN_SIGNAL
from ephemwork.config import load_config
from ephemwork.errors import StateError
from ephemwork.identity import resolve_user, validate_name

log = structlog.get_logger()

# Seconds to wait for an `up` process to deregister and exit after SIGTERM. `up` stops its
# dev server with SIGKILL after the service's stop_timeout (5 s by default), so this leaves
# room for that and for deregistering.
STOP_WAIT = 15.0


async def run_down(config_path: Path | None, service: str | None) -> None:
    """Stop this user's ``up`` for *service*, or for every service when it is None.

    ``down`` works from local state alone; an explicit *config_path* is still validated, so a
    mistyped ``--config`` fails as it does for ``up``.
    """
    if config_path is not None:
        load_config(config_path)
    if service is not None:
        validate_name("service", service)
    user = resolve_user()
    store = StateStore()

    records = [
        record
        for record in store.list_records()
        if record.user == user and (service is None or record.service == service)
    ]
    if not records:
        target = f"{user}:{service}" if service else f"user {user}"
        click.echo(f"No running `ephemwork up` for {target}.")
        return

    by_pid: dict[int, list[SessionRecord]] = {}
    for record in records:
        by_pid.setdefault(record.pid, []).append(record)

    for pid, owned in by_pid.items():
        await _stop_owner(store, pid, owned)


async def _stop_owner(store: StateStore, pid: int, records: list[SessionRecord]) -> None:
    routes = ", ".join(record.header_value for record in records)
    first = records[0]

    if not is_process_alive(pid, first.pid_start_ticks):
        log.info("down.stale_record", routes=routes, pid=pid)
        if unproven_process_runs(pid, first.pid_start_ticks):
            click.echo(unproven_message(pid, routes))
        else:
            click.echo(
                f"`ephemwork up` (pid {pid}) for {routes} is no longer running; "
                "cleaning up after it."
            )
        for record in records:
            await clean_stale_record(record, click.echo)
            store.remove(record.user, record.service)
        click.echo(f"Removed the local record of {routes}.")
        return

    # By route, not by whole record: `up` may change a record's state or last_error
    # between the two reads.
    requested = {(record.user, record.service) for record in records}
    others = [
        record.header_value
        for record in store.list_records()
        if record.pid == pid and (record.user, record.service) not in requested
    ]
    if others:
        await _stop_services(store, pid, records, others)
        return

    log.info("down.stopping", routes=routes, pid=pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)

    deadline = time.monotonic() + STOP_WAIT
    while is_process_alive(pid, first.pid_start_ticks):
        if time.monotonic() > deadline:
            raise StateError(
                f"`ephemwork up` (pid {pid}) did not stop within {STOP_WAIT:.0f} s of SIGTERM. "
                f"Stop it by hand with `kill {pid}`."
            )
        await asyncio.sleep(0.1)

    click.echo(f"Stopped `ephemwork up` (pid {pid}) for {routes}.")


async def _stop_services(
    store: StateStore, pid: int, records: list[SessionRecord], others: list[str]
) -> None:
    """Ask the `up` with *pid* to stop only *records*' services; it keeps serving *others*."""
    routes = ", ".join(record.header_value for record in records)
    for record in records:
        store.update(record.user, record.service, state="stop_requested")
    log.info("down.stopping_services", routes=routes, pid=pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, DOWN_SIGNAL)

    deadline = time.monotonic() + STOP_WAIT
    while any(_still_served(store, record) for record in records):
        if time.monotonic() > deadline:
            raise StateError(
                f"`ephemwork up` (pid {pid}) did not stop {routes} within {STOP_WAIT:.0f} s. "
                f"Stop the whole process with `kill {pid}`."
            )
        if not is_process_alive(pid, records[0].pid_start_ticks):
            break
        await asyncio.sleep(0.1)

    click.echo(
        f"Stopped {routes} in `ephemwork up` (pid {pid}); it still serves {', '.join(others)}."
    )


def unproven_message(pid: int, routes: str) -> str:
    """Return the message for a live *pid* whose record has no start time to prove it ours."""
    return (
        f"Process {pid} is running, but its start time was not recorded, so ephemwork cannot "
        f"tell whether it is the `ephemwork up` that served {routes}; it is not signalled. "
        f"Cleaning up the record. If pid {pid} is that `up`, stop it with `kill {pid}`."
    )


def _still_served(store: StateStore, record: SessionRecord) -> bool:
    current = store.get(record.user, record.service)
    return current is not None and current.pid == record.pid
