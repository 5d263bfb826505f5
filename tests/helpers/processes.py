"""Inspect processes through /proc, as tests that check for leftovers need."""

from __future__ import annotations

from pathlib import Path


def live_group_members(pgid: int) -> list[int]:
    """Return the pids in process group *pgid* that are not zombies.

    A zombie has exited and holds no port. An orphaned one waits for init to reap it, and a
    container's init may take its time, so it does not count as left behind.
    """
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # After the parenthesized command name: state, ppid, pgrp, ...
        fields = stat.rpartition(")")[2].split()
        if fields[2] == str(pgid) and fields[0] != "Z":
            members.append(int(entry.name))
    return members
