"""``ephemwork status``: this user's sessions, from local state and from their bastions.

Each row puts three views side by side: the local record (and whether its ``up`` still
runs), the bastion's session for the route, and one probe request through the bastion's
proxy. The STATE column shows "connected" only when the probe came back from the laptop.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import click

from ephemwork.client.state import BastionEndpoint, SessionRecord, StateStore, is_process_alive
from ephemwork.config import load_config
from ephemwork.identity import resolve_user
from ephemwork.wire import Session

if TYPE_CHECKING:
    from ephemwork.client.bastionview import BastionView, ProbeResult

COLUMNS = (
    "SERVICE",
    "HEADER",
    "LOCAL PORT",
    "BASTION PORT",
    "LOCAL",
    "BASTION",
    "STATE",
    "UPTIME",
    "LAST ERROR",
)


@attrs.frozen
class _Row:
    """One route as `status` shows it."""

    service: str
    header_value: str
    local_port: int | None
    # The port in local state, and the one the bastion reports; None where unknown.
    bastion_port: int | None
    bastion_reported_port: int | None
    pid: int | None
    # The record's state, "stale" when its `up` is gone, or "-" without a local record.
    local_state: str
    # "registered", "not registered", "unreachable", or "-" when not asked.
    bastion_state: str
    state: str
    uptime_seconds: int | None
    last_error: str
    probe: ProbeResult | None


async def run_status(config_path: Path | None, *, as_json: bool) -> None:
    """Print this user's sessions as a table, or as JSON with ``as_json``.

    The sessions come from local state; an explicit *config_path* is still validated.
    """
    if config_path is not None:
        load_config(config_path)
    user = resolve_user()
    records = [record for record in StateStore().list_records() if record.user == user]
    alive = {id(record): is_process_alive(record.pid, record.pid_start_ticks) for record in records}

    views = await _ask_bastions(user, records, alive)
    rows = [_row(record, alive[id(record)], views) for record in records]
    rows += _bastion_only_rows(records, views)

    if as_json:
        document = {"user": user, "sessions": [_row_json(row) for row in rows]}
        click.echo(json.dumps(document, indent=2))
        return

    if not rows:
        click.echo(f"No sessions for user {user}. Start one with `ephemwork up SERVICE`.")
        return
    _print_table(rows)


def _endpoint_key(endpoint: BastionEndpoint) -> str:
    return json.dumps(attrs.asdict(endpoint), sort_keys=True)


async def _ask_bastions(
    user: str, records: list[SessionRecord], alive: dict[int, bool]
) -> dict[str, BastionView]:
    """Ask each bastion that a record names; an in-process bastion only while its `up` runs."""
    by_endpoint: dict[str, tuple[BastionEndpoint, list[str]]] = {}
    for record in records:
        endpoint = record.bastion
        if endpoint is None or (endpoint.in_process and not alive[id(record)]):
            continue
        _, probe_routes = by_endpoint.setdefault(_endpoint_key(endpoint), (endpoint, []))
        if alive[id(record)] and record.session_id:
            probe_routes.append(record.header_value)

    if not by_endpoint:
        return {}

    # Imported here because asyncssh takes about half a second to import, which `status`
    # without sessions to ask about does not need.
    from ephemwork.client.bastionview import inspect_bastion

    views = {}
    for key, (endpoint, probe_routes) in by_endpoint.items():
        views[key] = await inspect_bastion(endpoint, user, probe_routes)
    return views


def _row(record: SessionRecord, alive: bool, views: dict[str, BastionView]) -> _Row:
    view = views.get(_endpoint_key(record.bastion)) if record.bastion is not None else None
    session = _find_session(view, record) if view is not None else None
    probe = view.probes.get(record.header_value) if view is not None else None

    if view is None:
        bastion_state = "-"
    elif not view.reachable:
        bastion_state = "unreachable"
    else:
        bastion_state = "registered" if session is not None else "not registered"

    state, problem = _overall_state(record, alive, view, session, probe)
    return _Row(
        service=record.service,
        header_value=record.header_value,
        local_port=record.local_port,
        bastion_port=record.bastion_port or None,
        bastion_reported_port=session.port if session is not None else None,
        pid=record.pid,
        local_state=record.state if alive else "stale",
        bastion_state=bastion_state,
        state=state,
        uptime_seconds=round(time.time() - record.started_at) if alive else None,
        last_error=problem or record.last_error,
        probe=probe,
    )


def _overall_state(
    record: SessionRecord,
    alive: bool,
    view: BastionView | None,
    session: Session | None,
    probe: ProbeResult | None,
) -> tuple[str, str]:
    """Return the STATE column and the problem to show, "" when there is none."""
    if not alive:
        if session is not None:
            return "stale", "the bastion still routes it until its lease expires"
        return "stale", "its `ephemwork up` is gone; run `ephemwork down` to clean up"
    if record.state in ("starting", "stop_requested"):
        return record.state, ""
    if view is None:
        return record.state, ""
    if not view.reachable:
        return "bastion unreachable", view.error
    if session is None:
        return "not registered", "the bastion holds no session for this route"
    if probe is None:
        return "unknown", "no probe was sent"
    if not probe.from_laptop:
        return "broken", probe.detail
    if not probe.dev_server_up:
        return "dev server down", probe.detail
    return "connected", ""


def _find_session(view: BastionView, record: SessionRecord) -> Session | None:
    # The bastion lists sessions without their ids, so a session is matched by its route
    # and port: another laptop's session for the same route holds another port.
    for session in view.sessions:
        if (
            session.route.header_value == record.header_value
            and session.port == record.bastion_port
        ):
            return session
    return None


def _bastion_only_rows(records: list[SessionRecord], views: dict[str, BastionView]) -> list[_Row]:
    """Rows for sessions a bastion holds for this user that no local record names."""
    known = {(record.header_value, record.bastion_port) for record in records}
    rows = []
    for view in views.values():
        for session in view.sessions:
            if (session.route.header_value, session.port) in known:
                continue
            rows.append(
                _Row(
                    service=session.service,
                    header_value=session.route.header_value,
                    local_port=None,
                    bastion_port=None,
                    bastion_reported_port=session.port,
                    pid=None,
                    local_state="-",
                    bastion_state="registered",
                    state="not on this laptop",
                    uptime_seconds=round(time.time() - session.registered_at),
                    last_error=f"registered by {session.client}",
                    probe=None,
                )
            )
    return rows


def _row_json(row: _Row) -> dict[str, Any]:
    document = attrs.asdict(row)
    document["probe"] = attrs.asdict(row.probe) if row.probe is not None else None
    return document


def _print_table(rows: list[_Row]) -> None:
    table = [COLUMNS] + [
        (
            row.service,
            row.header_value,
            _cell(row.local_port),
            _bastion_port_cell(row),
            row.local_state,
            row.bastion_state,
            row.state,
            _format_duration(row.uptime_seconds),
            row.last_error or "-",
        )
        for row in rows
    ]
    widths = [max(len(line[column]) for line in table) for column in range(len(COLUMNS))]
    for line in table:
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )


def _bastion_port_cell(row: _Row) -> str:
    reported = row.bastion_reported_port
    if reported is not None and row.bastion_port is not None and reported != row.bastion_port:
        return f"{row.bastion_port} (bastion: {reported})"
    return _cell(row.bastion_port if row.bastion_port is not None else reported)


def _cell(value: int | None) -> str:
    return "-" if value is None else str(value)


def _format_duration(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
