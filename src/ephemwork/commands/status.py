"""``ephemwork status``: this user's sessions as recorded on this laptop."""

from __future__ import annotations

import json
import time
from pathlib import Path

import attrs
import click

from ephemwork.client.state import StateStore, is_process_alive
from ephemwork.identity import resolve_user

COLUMNS = ("SERVICE", "HEADER", "LOCAL PORT", "BASTION PORT", "STATE", "UPTIME", "PID")


async def run_status(config_path: Path | None, *, as_json: bool) -> None:
    """Print this user's sessions, marking those whose ``up`` process is gone as stale."""
    del config_path
    user = resolve_user()
    records = [record for record in StateStore().list_records() if record.user == user]

    rows = []
    for record in records:
        alive = is_process_alive(record.pid, record.pid_start_ticks)
        rows.append(
            {
                **attrs.asdict(record),
                "header_value": record.header_value,
                "state": record.state if alive else "stale",
                "uptime_seconds": round(time.time() - record.started_at) if alive else None,
            }
        )

    if as_json:
        click.echo(json.dumps({"user": user, "sessions": rows}, indent=2))
        return

    if not rows:
        click.echo(f"No sessions for user {user}. Start one with `ephemwork up SERVICE`.")
        return

    table = [COLUMNS] + [
        (
            row["service"],
            row["header_value"],
            str(row["local_port"]),
            str(row["bastion_port"] or "-"),
            row["state"],
            _format_duration(row["uptime_seconds"]),
            str(row["pid"]),
        )
        for row in rows
    ]
    widths = [max(len(line[column]) for line in table) for column in range(len(COLUMNS))]
    for line in table:
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )


def _format_duration(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
