"""Child processes of the harness: started in their own process group, always stopped.

`Processes` keeps every child it starts and ends them all in `stop_all`, which the harness
calls in a ``finally`` block and at exit, so nothing outlives a run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs

STOP_TIMEOUT = 5.0


@attrs.define
class Child:
    """A started process, with the file its stdout and stderr go to."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        """Send SIGTERM to the process group, then SIGKILL after `STOP_TIMEOUT`."""
        if self.process.poll() is not None:
            return
        _signal_group(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _signal_group(self.process.pid, signal.SIGKILL)
            self.process.wait()


@attrs.define
class Processes:
    """Every child the harness started, in start order."""

    log_dir: Path
    children: list[Child] = attrs.field(factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Child:
        """Start *argv* in a new session, its output in ``LOG_DIR/NAME.log``."""
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        child = Child(name, process, log_path)
        self.children.append(child)
        return child

    def stop(self, child: Child) -> None:
        child.stop()
        if child in self.children:
            self.children.remove(child)

    def stop_all(self) -> None:
        """Stop every child, the last started first."""
        while self.children:
            self.children.pop().stop()


def _signal_group(pid: int, signum: signal.Signals) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass


def wait_for_port(port: int, child: Child | None = None, timeout: float = 30.0) -> None:
    """Return once 127.0.0.1:*port* accepts a connection; raise if *child* exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and child.process.poll() is not None:
            raise RuntimeError(
                f"{child.name} exited before listening on {port}:\n{child.log_text()}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def wait_for_text(child: Child, text: str, timeout: float = 45.0) -> None:
    """Return once *text* appears in the child's log; raise if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in child.log_text():
            return
        if child.process.poll() is not None:
            raise RuntimeError(f"{child.name} exited before printing {text!r}:\n{child.log_text()}")
        time.sleep(0.05)
    raise TimeoutError(
        f"{child.name} did not print {text!r} within {timeout} s:\n{child.log_text()}"
    )


def free_ports(count: int) -> list[int]:
    """Return *count* distinct free TCP ports on 127.0.0.1."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port_range(size: int) -> tuple[int, int]:
    """Return a range of *size* ports below the ephemeral range that nothing listens on."""
    for low in range(21000, 32000, size):
        ports = range(low, low + size)
        if all(_is_free(port) for port in ports):
            return low, low + size - 1
    raise RuntimeError(f"no {size} consecutive free ports between 21000 and 32000")


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
