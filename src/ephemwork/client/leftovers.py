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

from pathlib import Path

import structlog

from ephemwork.client.processgroup import group_members, terminate_group
from ephemwork.client.state import process_start_ticks

log = structlog.get_logger()

MARKER_ENV_VAR = "EPHEMWORK_DEV_SERVER_ID"


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
    if await terminate_group(pgid, stop_timeout):
        log.info("leftover.stopped", pgid=pgid)
    return True


def _carries_marker(pid: int, marker: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{MARKER_ENV_VAR}={marker}".encode() in environ.split(b"\0")
