"""Finding and stopping a dev server that a killed ``up`` left running.

``up`` starts each dev server in its own process group, and ``kill -9`` of ``up`` leaves that
group running with the service's port held. ``up`` records the group id, the start time of
the group's leader and a random marker that it puts into the dev server's environment as
``EPHEMWORK_DEV_SERVER_ID``. A group id may be reused once the whole group has exited, so
`recorded_group_alive` accepts the group only when it can prove it is the recorded one:

- the leader (pid == pgid) still runs and started at the recorded time; Linux never hands
  out a pid that equals the id of a live process group, so a leader with another start time
  means the old group is gone and a new process got its number;
- or the leader has exited and a live member of the group carries the marker, which every
  descendant inherits unless it clears its environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

import structlog

from ephemwork.client.state import process_start_ticks

log = structlog.get_logger()

MARKER_ENV_VAR = "EPHEMWORK_DEV_SERVER_ID"

# Seconds to wait after SIGKILL for the group to go.
KILL_WAIT = 5.0
_POLL_INTERVAL = 0.05


def group_members(pgid: int, proc: Path = Path("/proc")) -> list[int]:
    """Return the pids of process group *pgid* that are not zombies."""
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # After the parenthesized command name: state, ppid, pgrp, ...
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def recorded_group_alive(pgid: int, leader_start_ticks: int | None, marker: str) -> bool:
    """Return whether the dev server group recorded as *pgid* still has live members."""
    members = group_members(pgid)
    if not members:
        return False

    leader_ticks = process_start_ticks(pgid)
    if leader_ticks is not None:
        return leader_start_ticks is not None and leader_ticks == leader_start_ticks
    return bool(marker) and any(_carries_marker(pid, marker) for pid in members)


async def stop_recorded_group(
    pgid: int, leader_start_ticks: int | None, marker: str, stop_timeout: float
) -> bool:
    """Stop the recorded dev server group: SIGTERM, then SIGKILL after *stop_timeout* seconds.

    Returns False, and signals nothing, when the group is gone or is not the recorded one.
    """
    if not recorded_group_alive(pgid, leader_start_ticks, marker):
        return False

    log.info("leftover.stopping", pgid=pgid, members=group_members(pgid))
    _signal_group(pgid, signal.SIGTERM)
    if not await _wait_gone(pgid, stop_timeout):
        log.warning("leftover.kill", pgid=pgid, stop_timeout=stop_timeout)
        _signal_group(pgid, signal.SIGKILL)
        if not await _wait_gone(pgid, KILL_WAIT):
            log.error("leftover.survived_kill", pgid=pgid, members=group_members(pgid))
            return True

    log.info("leftover.stopped", pgid=pgid)
    return True


def _carries_marker(pid: int, marker: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{MARKER_ENV_VAR}={marker}".encode() in environ.split(b"\0")


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


async def _wait_gone(pgid: int, limit: float) -> bool:
    deadline = time.monotonic() + limit
    while group_members(pgid):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_POLL_INTERVAL)
    return True
