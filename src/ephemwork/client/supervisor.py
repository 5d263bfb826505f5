"""The dev server of one service: build it, run it, wait until it is healthy, stop it.

Each command runs through the shell in its own session and process group, so `stop` can
signal the dev server and everything it started (reloaders, workers, watchers) with one
``killpg``. Output is relayed line by line with a ``service |`` prefix through a writer
thread, so a terminal that stops reading cannot stall the event loop or the dev server.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import secrets
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TextIO

import aiohttp
import structlog

from ephemwork.client.envfile import build_environment
from ephemwork.client.leftovers import MARKER_ENV_VAR, recorded_group_alive
from ephemwork.client.portowner import find_port_owner, port_accepts_connections
from ephemwork.client.processgroup import terminate_group
from ephemwork.client.state import process_start_ticks
from ephemwork.config import ServiceConfig
from ephemwork.errors import ConfigError, DevServerError

log = structlog.get_logger()

# Lines of output kept for error messages.
RECENT_LINES = 20

# Lines the writer thread may fall behind before new lines are dropped.
MAX_PENDING_LINES = 2000

# A line longer than this is cut; asyncio's default limit of 64 KiB is too small for some
# bundlers' minified stack traces.
LINE_LIMIT = 1024 * 1024

HEALTH_POLL_INTERVAL = 0.25
HEALTH_REQUEST_TIMEOUT = 2.0

# A progress line every few seconds when output is not a terminal keeps logs short.
PLAIN_PROGRESS_INTERVAL = 5.0

# Seconds to wait for the output relay to read the last lines after a process exits.
RELAY_DRAIN_TIMEOUT = 1.0

_CLEAR_LINE = "\r\x1b[K"


class OutputRelay:
    """Writes lines to a stream from a daemon thread, dropping lines the stream cannot take.

    A terminal paused with Ctrl-S, or a slow SSH session, blocks ``write``. The event loop
    only queues lines. When the queue is full, new lines are counted and dropped, and a
    note with the count is written once the queue has room again.
    """

    _stream: TextIO
    _is_tty: bool
    _queue: queue.Queue[str | None]
    _dropped: int
    _status_shown: bool
    _thread: threading.Thread | None
    _closed: bool

    def __init__(self, stream: TextIO, *, max_pending: int = MAX_PENDING_LINES) -> None:
        self._stream = stream
        self._is_tty = stream.isatty()
        self._queue = queue.Queue(maxsize=max_pending)
        self._dropped = 0
        self._status_shown = False
        self._thread = None
        self._closed = False

    @property
    def is_tty(self) -> bool:
        """Whether the stream is a terminal, where a status line can be redrawn in place."""
        return self._is_tty

    def write_line(self, line: str) -> None:
        """Queue *line* for the writer thread without blocking; drop it if the queue is full."""
        prefix = _CLEAR_LINE if self._status_shown else ""
        self._status_shown = False
        self._enqueue(f"{prefix}{line}\n")

    def write_status(self, text: str) -> None:
        """Show *text* as a status line, redrawn in place on a terminal."""
        if self._is_tty:
            self._status_shown = True
            self._enqueue(f"{_CLEAR_LINE}{text}")
        else:
            self._enqueue(f"{text}\n")

    def clear_status(self) -> None:
        """Erase the status line from a terminal."""
        if self._status_shown:
            self._status_shown = False
            self._enqueue(_CLEAR_LINE)

    def close(self) -> None:
        """Ask the writer thread to write what is queued and stop."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            # These puts may wait for room in a full queue, but only in this one call.
            with contextlib.suppress(queue.Full):
                if self._dropped:
                    self._queue.put(self._dropped_note(), timeout=RELAY_DRAIN_TIMEOUT)
                    self._dropped = 0
                self._queue.put(None, timeout=RELAY_DRAIN_TIMEOUT)

    async def wait_closed(self) -> None:
        """Wait a moment for the writer thread to finish; a blocked terminal is left behind."""
        self.close()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, RELAY_DRAIN_TIMEOUT)

    def _enqueue(self, text: str) -> None:
        if self._closed:
            return
        self._ensure_thread()

        if self._dropped:
            try:
                self._queue.put_nowait(self._dropped_note())
            except queue.Full:
                self._dropped += 1
                return
            self._dropped = 0

        try:
            self._queue.put_nowait(text)
        except queue.Full:
            self._dropped += 1

    def _dropped_note(self) -> str:
        return f"[ephemwork: {self._dropped} lines dropped, the terminal was too slow]\n"

    def _ensure_thread(self) -> None:
        if self._thread is None:
            # A daemon thread, so a terminal that never reads again cannot keep us from exiting.
            self._thread = threading.Thread(
                target=self._write_forever, name="ephemwork-output", daemon=True
            )
            self._thread.start()

    def _write_forever(self) -> None:
        while True:
            text = self._queue.get()
            if text is None:
                self._stream.flush()
                return
            self._stream.write(text)
            if self._queue.empty():
                self._stream.flush()


class DevServer:
    """The dev server process of one service and its process group."""

    service: ServiceConfig
    cwd: Path
    root: Path
    _env: dict[str, str] | None
    _output: OutputRelay
    _recent: collections.deque[str]
    _process: asyncio.subprocess.Process | None
    # Start time of the run command's shell, which leads its group, for `_group_is_ours`.
    _leader_start_ticks: int | None
    _build_process: asyncio.subprocess.Process | None
    _relay_tasks: list[asyncio.Task[None]]
    _stop_lock: asyncio.Lock
    _stopped: bool
    _close_task: asyncio.Task[None] | None
    # A random value in the environment of every process of this dev server; see
    # `ephemwork.client.leftovers`.
    marker: str
    _on_started: Callable[[DevServer], None] | None

    def __init__(
        self,
        service: ServiceConfig,
        root: Path,
        *,
        output: TextIO | None = None,
        on_started: Callable[[DevServer], None] | None = None,
    ) -> None:
        self.service = service
        self.marker = secrets.token_hex(8)
        self._on_started = on_started
        self.cwd = root / service.cwd if service.cwd else root
        self.root = root
        # Built on the first build or start, so env files are read once per `up`.
        self._env = None
        self._output = OutputRelay(output if output is not None else sys.stdout)
        self._recent = collections.deque(maxlen=RECENT_LINES)
        self._process = None
        self._leader_start_ticks = None
        self._build_process = None
        self._relay_tasks = []
        self._stop_lock = asyncio.Lock()
        self._stopped = False
        self._close_task = None

    @property
    def name(self) -> str:
        """The service name, used as the output prefix."""
        return self.service.name

    @property
    def pid(self) -> int | None:
        """The pid of the run command's shell, which also leads its process group."""
        return self._process.pid if self._process is not None else None

    async def build(self) -> None:
        """Run ``build_command`` once, if set, and raise `DevServerError` if it fails."""
        command = self.service.build_command
        if command is None:
            return

        log.info("dev_server.build_started", service=self.name, command=command)
        process = await self._spawn(command, merge_stderr=True)
        self._build_process = process
        assert process.stdout is not None
        relay = self._start_relay(process.stdout, f"{self.name} build")

        try:
            exit_code = await process.wait()
        except asyncio.CancelledError:
            await self._terminate(process, "build")
            raise
        finally:
            await self._drain_relays([relay])
            self._build_process = None

        if self._stopped:
            raise DevServerError(
                f"{self.name}: build_command {command!r} was stopped before it finished."
            )
        if exit_code != 0:
            raise DevServerError(
                f"{self.name}: build_command {command!r} exited with code {exit_code}."
                f"{self._recent_output()}\nFix the build, or change service.{self.name}."
                "build_command in ephemwork.toml."
            )
        log.info("dev_server.build_finished", service=self.name, pid=process.pid)

    async def start(self) -> None:
        """Start ``run_command``, if set, in its own process group and relay its output."""
        command = self.service.run_command
        if command is None:
            log.info("dev_server.external", service=self.name, port=self.service.port)
            return
        if self._stopped or (self._process is not None and self._process.returncode is None):
            raise RuntimeError("DevServer.start() needs a dev server that is not running.")

        self._check_port_free()
        self._recent.clear()
        process = await self._spawn(command, merge_stderr=False)
        self._process = process
        self._leader_start_ticks = process_start_ticks(process.pid)
        assert process.stdout is not None and process.stderr is not None
        self._relay_tasks = [
            self._start_relay(process.stdout, self.name),
            self._start_relay(process.stderr, self.name),
        ]
        # start_new_session=True makes the shell a session and group leader: pgid == pid.
        log.info(
            "dev_server.started",
            service=self.name,
            pid=process.pid,
            pgid=process.pid,
            command=command,
            cwd=str(self.cwd),
        )
        if self._on_started is not None:
            self._on_started(self)

    async def wait_healthy(self, timeout_seconds: float | None = None) -> None:
        """Poll the health check until it passes; raise `DevServerError` on exit or timeout.

        With ``health_check_path`` the check is a 2xx from that URL; without one, the port
        accepting TCP connections. *timeout_seconds* defaults to ``health_check_timeout``.
        """
        limit = self.service.health_check_timeout if timeout_seconds is None else timeout_seconds
        path = self.service.health_check_path
        target = f"http://127.0.0.1:{self.service.port}{path}" if path else None
        target_label = target or f"127.0.0.1:{self.service.port} (TCP)"

        started = time.monotonic()
        last_progress_at = -PLAIN_PROGRESS_INTERVAL
        timeout = aiohttp.ClientTimeout(total=HEALTH_REQUEST_TIMEOUT)
        # force_close: a kept-alive probe connection would outlive the check for nothing.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            while True:
                if self._process is not None and self._process.returncode is not None:
                    # Read the last lines first, so the error shows what the server printed.
                    await self._drain_relays(self._relay_tasks)
                self._raise_if_exited(target_label)

                result = await self._probe(http, target)
                elapsed = time.monotonic() - started
                if result is None:
                    self._output.clear_status()
                    self._output.write_line(
                        f"{self.name}: healthy at {target_label} ({elapsed:.1f}s)"
                    )
                    log.info(
                        "dev_server.healthy",
                        service=self.name,
                        target=target_label,
                        elapsed=elapsed,
                    )
                    return

                if elapsed >= limit:
                    self._output.clear_status()
                    raise DevServerError(
                        f"{self.name}: no healthy response from {target_label} within {limit:g}s "
                        f"(last result: {result}).{self._recent_output()}\nCheck that the dev "
                        f"server listens on port {self.service.port}, or raise "
                        f"service.{self.name}.health_check_timeout in ephemwork.toml."
                    )

                if self._output.is_tty or elapsed - last_progress_at >= PLAIN_PROGRESS_INTERVAL:
                    self._output.write_status(
                        f"{self.name}: waiting for {target_label} ({elapsed:.0f}s)"
                    )
                    last_progress_at = elapsed
                await asyncio.sleep(HEALTH_POLL_INTERVAL)

    async def wait_exited(self) -> int:
        """Wait until the run command's shell exits and return its exit code.

        Without ``run_command`` there is no process to watch, so this waits until cancelled.
        A negative code is the number of the signal that ended the shell.
        """
        if self.service.run_command is None:
            await asyncio.get_running_loop().create_future()
        if self._process is None:
            raise RuntimeError("DevServer.wait_exited() is only available after start().")
        return await self._process.wait()

    async def reap(self) -> None:
        """Stop the process group of the run command, so that `start` can run it again.

        The shell may still run, as after a health check that timed out. Or it may have
        exited and left behind a child that still listens on the port, so a restart would
        fail with "address in use".
        """
        if self._process is None:
            return
        if self._process.returncode is None:
            await self._terminate(self._process, "unhealthy")
        elif self._group_is_ours(self._process):
            await self._terminate(self._process, "leftovers")
        await self._drain_relays(self._relay_tasks)
        self._relay_tasks = []

    def recent_output(self) -> str:
        """Return the last lines the dev server printed, as text for a message."""
        return self._recent_output()

    async def stop(self) -> None:
        """Stop the build or dev server and every process in its group; idempotent."""
        async with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True

            if self._build_process is not None:
                await self._terminate(self._build_process, "build")
            if self._process is not None and self._process.returncode is None:
                await self._terminate(self._process, "run")
            elif self._process is not None and self._group_is_ours(self._process):
                await self._terminate(self._process, "leftovers")
            await self._drain_relays(self._relay_tasks)

    def close(self) -> None:
        """Start stopping the dev server; idempotent."""
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(
                self.stop(), name=f"ephemwork-stop-{self.name}"
            )

    async def wait_closed(self) -> None:
        """Wait until ``close()`` has stopped every process and flushed the output."""
        if self._close_task is not None:
            await self._close_task
        await self._output.wait_closed()

    async def __aenter__(self) -> DevServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()

    async def _spawn(self, command: str, *, merge_stderr: bool) -> asyncio.subprocess.Process:
        if not self.cwd.is_dir():
            # A configuration mistake, so it exits with code 2 like the others.
            raise ConfigError(
                f"{self.name}: working folder {str(self.cwd)!r} does not exist. Fix "
                f"service.{self.name}.cwd in ephemwork.toml (it is relative to the file's folder)."
            )

        if self._env is None:
            self._env = build_environment(
                self.root,
                self.service.env_file,
                self.service.env,
                service=self.name,
                defaults={"PORT": str(self.service.port)},
            )
            # Set last so that `down` can recognize this group even if an env file sets it.
            self._env[MARKER_ENV_VAR] = self.marker

        try:
            return await asyncio.create_subprocess_shell(
                command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT if merge_stderr else asyncio.subprocess.PIPE,
                cwd=self.cwd,
                env=self._env,
                start_new_session=True,
                limit=LINE_LIMIT,
            )
        except OSError as exc:
            raise DevServerError(
                f"{self.name}: cannot start {command!r}: {exc.strerror or exc}."
            ) from exc

    def _check_port_free(self) -> None:
        port = self.service.port
        if not port_accepts_connections(port):
            return

        owner = find_port_owner(port)
        holder = (
            f"process {owner.pid} ({owner.command!r})" if owner is not None else "another process"
        )
        raise DevServerError(
            f"{self.name}: port {port} on this laptop is already in use by {holder}, so the "
            f"dev server cannot listen on it. Stop that process, or remove run_command from "
            f"service.{self.name} to route to the server already on that port."
        )

    def _start_relay(self, reader: asyncio.StreamReader, prefix: str) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(
            self._relay(reader, prefix), name=f"ephemwork-relay-{prefix}"
        )

    async def _relay(self, reader: asyncio.StreamReader, prefix: str) -> None:
        while True:
            try:
                raw = await reader.readline()
            except ValueError:
                # readline() drops a line longer than the limit and raises; keep relaying.
                self._output.write_line(f"{prefix} | [line longer than {LINE_LIMIT} bytes cut]")
                continue
            if not raw:
                return

            line = raw.decode(errors="replace").rstrip("\r\n")
            self._recent.append(line)
            self._output.write_line(f"{prefix} | {line}")

    async def _drain_relays(self, tasks: list[asyncio.Task[None]]) -> None:
        if not tasks:
            return
        # A process that escaped the group (setsid, double fork) may keep the pipe open,
        # so the relay gets a short grace period instead of waiting for EOF forever.
        _done, pending = await asyncio.wait(tasks, timeout=RELAY_DRAIN_TIMEOUT)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    def _raise_if_exited(self, target_label: str) -> None:
        if self._process is None or self._process.returncode is None:
            return
        raise DevServerError(
            f"{self.name}: the dev server exited with code {self._process.returncode} before "
            f"{target_label} became healthy.{self._recent_output()}\nFix "
            f"service.{self.name}.run_command, or run it by hand in {str(self.cwd)!r} to see "
            "the error."
        )

    async def _probe(self, http: aiohttp.ClientSession, url: str | None) -> str | None:
        if url is None:
            return await self._probe_tcp()

        try:
            async with http.get(url, allow_redirects=False) as response:
                if 200 <= response.status < 300:
                    return None
                return f"HTTP {response.status}"
        except aiohttp.ClientError as exc:
            return _describe_error(exc)
        except TimeoutError:
            return f"no response within {HEALTH_REQUEST_TIMEOUT:g}s"

    async def _probe_tcp(self) -> str | None:
        try:
            async with asyncio.timeout(HEALTH_REQUEST_TIMEOUT):
                _reader, writer = await asyncio.open_connection("127.0.0.1", self.service.port)
        except TimeoutError:
            return f"no connection within {HEALTH_REQUEST_TIMEOUT:g}s"
        except OSError as exc:
            return exc.strerror or str(exc)

        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return None

    def _group_is_ours(self, process: asyncio.subprocess.Process) -> bool:
        """Return whether the group of the exited, reaped *process* still has our processes.

        Once the shell is reaped its pid, and so the group id, may belong to another process
        group (a restart backoff lasts up to 30 s), so a group is signalled only when
        `recorded_group_alive` proves it is this dev server's.
        """
        ours = recorded_group_alive(process.pid, self._leader_start_ticks, self.marker)
        if not ours:
            log.debug("dev_server.group_gone", service=self.name, pgid=process.pid)
        return ours

    async def _terminate(self, process: asyncio.subprocess.Process, role: str) -> None:
        pgid = process.pid
        log.info("dev_server.stopping", service=self.name, role=role, pid=process.pid, pgid=pgid)

        await terminate_group(pgid, self.service.stop_timeout, service=self.name, role=role)

        exit_code = await process.wait()
        log.info(
            "dev_server.stopped",
            service=self.name,
            role=role,
            pid=process.pid,
            pgid=pgid,
            exit_code=exit_code,
        )

    def _recent_output(self) -> str:
        if not self._recent:
            return " It printed nothing."
        lines = "\n".join(f"  {line}" for line in self._recent)
        return f" Last output:\n{lines}"


def _describe_error(exc: aiohttp.ClientError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return exc.os_error.strerror or str(exc.os_error)
    return str(exc) or type(exc).__name__
