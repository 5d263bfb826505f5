"""Run ephemwork commands as real subprocesses and watch their output."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


def ephemwork_argv(*args: str, pyz: Path | None = None) -> list[str]:
    """Return the command line that runs ephemwork from this checkout, or from *pyz*."""
    if pyz is not None:
        return [sys.executable, str(pyz), *args]
    return [sys.executable, "-m", "ephemwork", *args]


class RunningCommand:
    """A subprocess whose merged stdout and stderr are collected by a reader thread.

    The command runs in its own process group, so `kill_group` also ends anything it
    started if a test fails half-way.
    """

    process: subprocess.Popen[str]
    lines: list[str]
    _changed: threading.Condition

    def __init__(
        self, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path | None = None
    ) -> None:
        self.lines = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    @property
    def output(self) -> str:
        """Everything the command printed so far."""
        with self._changed:
            return "".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """Return the first match of *pattern* in an output line; fail after *timeout* seconds."""
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    match = compiled.search(line)
                    if match:
                        return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.process.poll() is not None and not self._reading):
                    raise AssertionError(
                        f"no line matched {pattern!r} within {timeout} s "
                        f"(exit code {self.process.poll()}). Output:\n{''.join(self.lines)}"
                    )
                self._changed.wait(min(remaining, 0.2))

    def send_signal(self, signum: signal.Signals) -> None:
        """Send *signum* to the command itself (not its group), as a terminal's Ctrl-C would."""
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Wait for the command to exit and return its exit code."""
        return self.process.wait(timeout)

    def kill_group(self) -> None:
        """Kill the command's process group; used in teardown."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)

    _reading = True

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        self.process.stdout.close()
        with self._changed:
            self._reading = False
            self._changed.notify_all()


def base_environment(home: Path, user: str = "alice") -> dict[str, str]:
    """Return an environment for ephemwork commands with their own home and user."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("EPHEMWORK_")}
    env["EPHEMWORK_HOME"] = str(home)
    env["EPHEMWORK_USER"] = user
    env["PYTHONUNBUFFERED"] = "1"
    return env
