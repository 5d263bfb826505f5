"""Process groups of dev servers: who is still in one, and stopping all of it.

Zombies count as gone everywhere here: they hold no port and no CPU, and an orphaned one
waits for init to reap it, which a container's init may take its time to do.

On Linux the process lists come from /proc. Where there is none, as on macOS,
`group_members` reads the output of ``ps`` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import structlog

log = structlog.get_logger()

# Seconds to wait after SIGKILL for the group to go.
KILL_WAIT = 5.0
_POLL_INTERVAL = 0.05

PROC_ROOT = Path("/proc")

# Seconds to wait for ``ps`` where there is no /proc.
PS_TIMEOUT = 5.0


def group_members(pgid: int, proc: Path | None = None) -> list[int]:
    """Return the pids of process group *pgid* that are not zombies.

    *proc* defaults to `PROC_ROOT`. Where it does not exist the list comes from ``ps``, and
    is empty if ``ps`` fails.
    """
    if proc is None:
        proc = PROC_ROOT
    if not proc.is_dir():
        return _group_members_from_ps(pgid)

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


def _group_members_from_ps(pgid: int) -> list[int]:
    try:
        listing = subprocess.run(
            ["ps", "-A", "-o", "pid=,pgid=,stat="],
            capture_output=True,
            text=True,
            check=True,
            timeout=PS_TIMEOUT,
            env={**os.environ, "LC_ALL": "C"},
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("process_group.ps_failed", pgid=pgid, error=str(exc))
        return []

    members = []
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) < 3 or not fields[0].isdigit() or fields[1] != str(pgid):
            continue
        if not fields[2].startswith("Z"):
            members.append(int(fields[0]))
    return members


def group_alive(pgid: int) -> bool:
    """Return whether process group *pgid* still has a process that is not a zombie."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True

    if not PROC_ROOT.is_dir():
        # killpg found the group. Without /proc, zombies are not filtered out here.
        return True
    return bool(group_members(pgid))


def signal_group(pgid: int, signum: signal.Signals) -> None:
    """Send *signum* to every process of group *pgid*; a group already gone is fine."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


async def wait_group_gone(pgid: int, limit: float) -> bool:
    """Wait up to *limit* seconds for group *pgid* to empty; return whether it did."""
    deadline = time.monotonic() + limit
    while group_alive(pgid):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_POLL_INTERVAL)
    return True


async def terminate_group(pgid: int, stop_timeout: float, **log_fields: object) -> bool:
    """Send SIGTERM to group *pgid*, then SIGKILL after *stop_timeout* seconds.

    Returns whether the group is gone. *log_fields* (such as the service name) go into the
    log lines about the escalation.
    """
    signal_group(pgid, signal.SIGTERM)
    if await wait_group_gone(pgid, stop_timeout):
        return True

    log.warning("process_group.kill", pgid=pgid, stop_timeout=stop_timeout, **log_fields)
    signal_group(pgid, signal.SIGKILL)
    if await wait_group_gone(pgid, KILL_WAIT):
        return True

    log.error("process_group.survived_kill", pgid=pgid, members=group_members(pgid), **log_fields)
    return False
