"""Recognizing and stopping the dev server group that a killed `up` left running."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ephemwork.client import processgroup, state
from ephemwork.client.leftovers import (
    MARKER_ENV_VAR,
    recorded_group_alive,
    stop_recorded_group,
)
from ephemwork.client.processgroup import group_members
from ephemwork.client.state import process_start_ticks

# A shell whose Python child starts a grandchild; every process sleeps.
FAMILY = (
    f"{sys.executable} -c 'import subprocess, sys, time; "
    'subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]); '
    "time.sleep(60)' & wait"
)


@pytest.fixture
def family() -> Iterator[subprocess.Popen[bytes]]:
    """A shell → python → python process group with a marker in its environment."""
    process = subprocess.Popen(
        ["sh", "-c", FAMILY],
        start_new_session=True,
        env={**os.environ, MARKER_ENV_VAR: "abc123"},
    )
    deadline = time.monotonic() + 10
    while len(group_members(process.pid)) < 3:
        assert time.monotonic() < deadline, "the process family did not start"
        time.sleep(0.02)
    yield process
    try:
        os.killpg(process.pid, 9)
    except ProcessLookupError:
        pass
    process.wait()


class TestRecordedGroup:
    def test_matching_leader(self, family: subprocess.Popen[bytes]) -> None:
        """A group whose leader has the recorded start time is the recorded one."""
        ticks = process_start_ticks(family.pid)

        assert recorded_group_alive(family.pid, ticks, "")

    def test_reused_leader(self, family: subprocess.Popen[bytes]) -> None:
        """A leader with another start time means the group id was reused."""
        ticks = process_start_ticks(family.pid)
        assert ticks is not None

        assert not recorded_group_alive(family.pid, ticks + 1, "abc123")

    async def test_stop_whole_group(self, family: subprocess.Popen[bytes]) -> None:
        """Stopping the group leaves no live member, grandchildren included."""
        ticks = process_start_ticks(family.pid)

        stopped = await stop_recorded_group(family.pid, ticks, "abc123", 2.0)
        family.wait()

        assert stopped
        assert group_members(family.pid) == []

    async def test_leader_gone_marker(self, family: subprocess.Popen[bytes]) -> None:
        """Without its leader, the group is recognized by the marker in its members."""
        os.kill(family.pid, 9)
        family.wait()

        assert recorded_group_alive(family.pid, 1, "abc123")
        assert not recorded_group_alive(family.pid, 1, "other")
        assert await stop_recorded_group(family.pid, 1, "abc123", 2.0)
        assert group_members(family.pid) == []

    def test_without_proc(
        self, family: subprocess.Popen[bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without /proc, as on macOS, the leader's start time comes from ps."""
        monkeypatch.setattr(processgroup, "PROC_ROOT", tmp_path / "no-proc")
        monkeypatch.setattr(state, "PROC_ROOT", tmp_path / "no-proc")
        ticks = process_start_ticks(family.pid)
        assert ticks is not None

        assert recorded_group_alive(family.pid, ticks, "abc123")
        assert not recorded_group_alive(family.pid, ticks + 1, "abc123")
