"""Tests of the dev-server supervisor with real shell commands and processes."""

from __future__ import annotations

import asyncio
import io
import os
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from ephemwork.client import processgroup
from ephemwork.client.processgroup import group_alive, group_members
from ephemwork.client.supervisor import DevServer, OutputRelay
from ephemwork.config import ServiceConfig
from ephemwork.errors import ConfigError, DevServerError

from .conftest import free_port, port_is_free, wait_until

# Starts a grandchild `sleep`, then serves HTTP; with "--ignore-term" it ignores SIGTERM.
SERVER_SCRIPT = textwrap.dedent(
    """
    import http.server, signal, subprocess, sys

    if "--ignore-term" in sys.argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    grandchild = subprocess.Popen(["sleep", "300"])
    print(f"grandchild {grandchild.pid} started", flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler
    )
    server.serve_forever()
    """
)


def _service(**fields: Any) -> ServiceConfig:
    fields.setdefault("port", free_port())
    fields.setdefault("name", "api")
    fields.setdefault("health_check_timeout", 10.0)
    return ServiceConfig(**fields)


def _server_command(tmp_path: Path, port: int, *extra: str) -> str:
    script = tmp_path / "server.py"
    script.write_text(SERVER_SCRIPT)
    return " ".join([sys.executable, str(script), str(port), *extra])


class TestBuild:
    async def test_prefixes_output(self, tmp_path: Path) -> None:
        """Build output is relayed with the service name and "build"."""
        output = io.StringIO()
        service = _service(build_command="echo compiled; echo warned >&2")

        async with DevServer(service, tmp_path, output=output) as server:
            await server.build()

        assert "api build | compiled\n" in output.getvalue()
        assert "api build | warned\n" in output.getvalue()

    async def test_failure(self, tmp_path: Path) -> None:
        """A failing build raises DevServerError with the command, exit code and output."""
        service = _service(build_command="echo boom; exit 3")

        async with DevServer(service, tmp_path, output=io.StringIO()) as server:
            with pytest.raises(DevServerError) as caught:
                await server.build()

        assert "'echo boom; exit 3' exited with code 3" in str(caught.value)
        assert "  boom" in str(caught.value)

    async def test_without_command(self, tmp_path: Path) -> None:
        """Without build_command, build does nothing."""
        output = io.StringIO()

        async with DevServer(_service(), tmp_path, output=output) as server:
            await server.build()

        assert output.getvalue() == ""

    async def test_cwd_and_env(self, tmp_path: Path) -> None:
        """Commands run in the service's cwd with its environment added."""
        (tmp_path / "sub").mkdir()
        output = io.StringIO()
        service = _service(
            cwd="sub",
            env={"EPHEMWORK_TEST_VALUE": "42"},
            build_command='pwd; echo "$EPHEMWORK_TEST_VALUE"',
        )

        async with DevServer(service, tmp_path, output=output) as server:
            await server.build()

        assert f"api build | {tmp_path / 'sub'}\n" in output.getvalue()
        assert "api build | 42\n" in output.getvalue()

    async def test_missing_cwd(self, tmp_path: Path) -> None:
        """A cwd that does not exist raises ConfigError, exit code 2, naming the key."""
        service = _service(cwd="nowhere", build_command="true")

        async with DevServer(service, tmp_path, output=io.StringIO()) as server:
            with pytest.raises(ConfigError) as caught:
                await server.build()

        assert "service.api.cwd" in str(caught.value)
        assert caught.value.exit_code == 2


class TestRunAndStop:
    async def test_stop_clears_group(self, tmp_path: Path) -> None:
        """stop() ends the server and its grandchild, and frees the port."""
        port = free_port()
        output = io.StringIO()
        service = _service(
            port=port, run_command=_server_command(tmp_path, port), health_check_path="/"
        )

        async with DevServer(service, tmp_path, output=output) as server:
            await server.start()
            await server.wait_healthy()
            await wait_until(lambda: "grandchild" in output.getvalue(), "the grandchild starts")
            pgid = server.pid
            assert pgid is not None

            await server.stop()

            assert not group_alive(pgid)
            assert port_is_free(port)

    async def test_kill_after_stop_timeout(self, tmp_path: Path) -> None:
        """A server that ignores SIGTERM is killed after stop_timeout."""
        port = free_port()
        command = _server_command(tmp_path, port, "--ignore-term")
        service = _service(port=port, run_command=command, stop_timeout=0.3)

        async with DevServer(service, tmp_path, output=io.StringIO()) as server:
            await server.start()
            await server.wait_healthy()
            pgid = server.pid
            assert pgid is not None

            await server.stop()

            assert not group_alive(pgid)
            assert port_is_free(port)

    async def test_relays_both_streams(self, tmp_path: Path) -> None:
        """stdout and stderr lines are relayed with the service prefix."""
        port = free_port()
        output = io.StringIO()
        service = _service(port=port, run_command=_server_command(tmp_path, port))

        async with DevServer(service, tmp_path, output=output) as server:
            await server.start()
            await wait_until(lambda: "api | to stderr" in output.getvalue(), "stderr is relayed")
            await wait_until(lambda: "api | grandchild" in output.getvalue(), "stdout is relayed")

    async def test_stop_is_idempotent(self, tmp_path: Path) -> None:
        """A second stop() returns at once."""
        service = _service(run_command="sleep 30")

        async with DevServer(service, tmp_path, output=io.StringIO()) as server:
            await server.start()
            await server.stop()
            await server.stop()

            assert server.pid is not None
            assert not group_alive(server.pid)

    async def test_stop_before_start(self, tmp_path: Path) -> None:
        """stop() on a server that was never started does nothing."""
        server = DevServer(_service(run_command="sleep 30"), tmp_path, output=io.StringIO())

        await server.stop()

        assert server.pid is None

    async def test_close_stops(self, tmp_path: Path) -> None:
        """close() and wait_closed() stop the process group."""
        server = DevServer(_service(run_command="sleep 30"), tmp_path, output=io.StringIO())
        await server.start()
        pgid = server.pid
        assert pgid is not None

        server.close()
        await server.wait_closed()

        assert not group_alive(pgid)

    async def test_reap_stops_running(self, tmp_path: Path) -> None:
        """reap() stops a shell that still runs, so start() can run the command again."""
        server = DevServer(_service(run_command="sleep 30"), tmp_path, output=io.StringIO())
        async with server:
            await server.start()
            first = server.pid
            assert first is not None

            await server.reap()
            await server.start()

            assert not group_alive(first)
            assert server.pid != first

    async def test_reap_stops_leftover_child(self, tmp_path: Path) -> None:
        """reap() after the shell exited stops the child it left in the group."""
        # The child leaves the pipes, so it outlives the shell whatever asyncio does with them.
        service = _service(run_command="sleep 30 >/dev/null 2>&1 & exit 3")

        async with DevServer(service, tmp_path, output=io.StringIO()) as server:
            await server.start()
            await server.wait_exited()
            pgid = server.pid
            assert pgid is not None
            await wait_until(lambda: bool(group_members(pgid)), "the child runs")

            await server.reap()

            assert not group_alive(pgid)

    async def test_stop_after_exit_signals_nothing(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """stop() after the shell exited and was reaped sends no signal to its old group id."""
        signals: list[tuple[int, int]] = []
        real_killpg = os.killpg

        def spy(pgid: int, signum: int) -> None:
            signals.append((pgid, signum))
            real_killpg(pgid, signum)

        monkeypatch.setattr(processgroup.os, "killpg", spy)
        server = DevServer(_service(run_command="exit 3"), tmp_path, output=io.StringIO())
        async with server:
            await server.start()
            await server.wait_exited()
            await server.reap()
            signals.clear()

            await server.stop()

        assert [entry for entry in signals if entry[1] != 0] == []


class TestWaitHealthy:
    async def test_tcp_check(self, tmp_path: Path) -> None:
        """Without a health path, the check passes once the port accepts connections."""
        port = free_port()
        output = io.StringIO()
        service = _service(port=port, run_command=_server_command(tmp_path, port))

        async with DevServer(service, tmp_path, output=output) as server:
            await server.start()
            await server.wait_healthy()

        assert f"api: healthy at 127.0.0.1:{port} (TCP)" in output.getvalue()

    async def test_timeout_names_url(self, tmp_path: Path) -> None:
        """A timeout names the polled URL and the timeout key."""
        port = free_port()
        service = _service(port=port, run_command="sleep 30", health_check_path="/health")

        async with DevServer(service, tmp_path, output=io.StringIO()) as server:
            await server.start()
            with pytest.raises(DevServerError) as caught:
                await server.wait_healthy(0.5)

        assert f"http://127.0.0.1:{port}/health within 0.5s" in str(caught.value)
        assert "service.api.health_check_timeout" in str(caught.value)

    async def test_non_2xx_is_unhealthy(self, tmp_path: Path) -> None:
        """A 404 from the health path is reported as the last result."""
        port = free_port()
        command = _server_command(tmp_path, port)
        service = _service(port=port, run_command=command, health_check_path="/missing")

        async with DevServer(service, tmp_path, output=io.StringIO()) as server:
            await server.start()
            with pytest.raises(DevServerError) as caught:
                await server.wait_healthy(1.0)

        assert "last result: HTTP 404" in str(caught.value)

    async def test_exit_before_healthy(self, tmp_path: Path) -> None:
        """A server that exits first raises DevServerError with its exit code and output."""
        service = _service(run_command="echo cannot bind; exit 4", health_check_path="/")

        async with DevServer(service, tmp_path, output=io.StringIO()) as server:
            await server.start()
            with pytest.raises(DevServerError) as caught:
                await server.wait_healthy()

        assert "exited with code 4" in str(caught.value)
        assert "cannot bind" in str(caught.value)

    async def test_shows_progress(self, tmp_path: Path) -> None:
        """A progress line names the target while waiting."""
        port = free_port()
        output = io.StringIO()
        service = _service(port=port, run_command="sleep 30", health_check_path="/health")

        async with DevServer(service, tmp_path, output=output) as server:
            await server.start()
            with pytest.raises(DevServerError):
                await server.wait_healthy(0.3)

        assert f"api: waiting for http://127.0.0.1:{port}/health (0s)" in output.getvalue()

    async def test_external_server(self, tmp_path: Path) -> None:
        """Without run_command, the check waits for a server started by someone else."""
        port = free_port()
        service = _service(port=port, health_check_path="/")

        async with (
            DevServer(service, tmp_path, output=io.StringIO()) as external,
            DevServer(
                _service(port=port, run_command=_server_command(tmp_path, port)),
                tmp_path,
                output=io.StringIO(),
            ) as real,
        ):
            await real.start()
            await external.start()
            await external.wait_healthy()

            assert external.pid is None


class _BlockedStream(io.StringIO):
    """A stream whose writes block until released, like a terminal paused with Ctrl-S."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.release.wait(10)
        return super().write(text)


class TestOutputRelay:
    async def test_slow_stream_drops_lines(self) -> None:
        """Lines beyond the queue are dropped and counted instead of blocking."""
        stream = _BlockedStream()
        relay = OutputRelay(stream, max_pending=3)

        for index in range(10):
            relay.write_line(f"line {index}")
        stream.release.set()
        await relay.wait_closed()

        assert "line 0\n" in stream.getvalue()
        assert "lines dropped, the terminal was too slow" in stream.getvalue()
        assert "line 9\n" not in stream.getvalue()

    async def test_keeps_order(self) -> None:
        """Lines are written in order when the stream keeps up."""
        stream = io.StringIO()
        relay = OutputRelay(stream)

        for index in range(100):
            relay.write_line(str(index))
        await relay.wait_closed()

        assert stream.getvalue().split() == [str(index) for index in range(100)]


class TestWaitExited:
    async def test_returns_exit_code(self, tmp_path: Path) -> None:
        """wait_exited returns the run command's exit code."""
        service = _service(run_command="exit 7")

        async with DevServer(service, tmp_path, output=io.StringIO()) as server:
            await server.start()
            exit_code = await server.wait_exited()

        assert exit_code == 7

    async def test_without_run_command(self, tmp_path: Path) -> None:
        """Without run_command, wait_exited waits until cancelled."""
        server = DevServer(_service(), tmp_path, output=io.StringIO())
        await server.start()

        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await server.wait_exited()
