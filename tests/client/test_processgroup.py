"""Listing the members of a process group, with and without /proc."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ephemwork.client.processgroup import group_members


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A sleeping process that leads its own process group."""
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    yield process
    process.kill()
    process.wait()


class TestGroupMembers:
    def test_with_proc(self, sleeper: subprocess.Popen[bytes]) -> None:
        """The leader of a live group is listed from /proc."""
        if not Path("/proc").is_dir():
            pytest.skip("needs /proc")

        assert group_members(sleeper.pid) == [sleeper.pid]

    def test_without_proc(self, sleeper: subprocess.Popen[bytes], tmp_path: Path) -> None:
        """Without /proc, as on macOS, the members come from ps instead of an error."""
        assert group_members(sleeper.pid, tmp_path / "no-proc") == [sleeper.pid]

    def test_without_proc_gone(self, tmp_path: Path) -> None:
        """Without /proc, a group with no process has no members."""
        process = subprocess.Popen(["true"], start_new_session=True)
        process.wait()

        assert group_members(process.pid, tmp_path / "no-proc") == []
