"""Restarting a dev server that exits, with real processes and a real health check."""

from __future__ import annotations

import asyncio
import io
import sys
import textwrap
from pathlib import Path

import pytest

from ephemwork.client import restarts
from ephemwork.client.forwarding import ServiceGate
from ephemwork.client.restarts import keep_running
from ephemwork.client.supervisor import DevServer
from ephemwork.config import ServiceConfig

from .conftest import free_port, wait_until

# Counts its runs in a file. Run 1 is healthy and exits 1 after half a second, run 2
# returns HTTP 500 and keeps running, and later runs are healthy.
FLAKY_SERVER = textwrap.dedent(
    """
    import http.server, os, pathlib, sys, threading

    counter = pathlib.Path(sys.argv[2])
    run = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(run))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(500 if run == 2 else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    if run == 1:
        threading.Timer(0.5, lambda: os._exit(1)).start()
    server.serve_forever()
    """
)


class TestKeepRunning:
    async def test_unhealthy_restart_retried(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A restart that stays unhealthy past the timeout is stopped and started again."""
        monkeypatch.setattr(restarts, "RESTART_BASE", 0.05)
        monkeypatch.setattr(restarts, "RESTART_CAP", 0.1)
        script = tmp_path / "server.py"
        script.write_text(FLAKY_SERVER)
        port = free_port()
        service = ServiceConfig(
            port=port,
            name="api",
            health_check_path="/health",
            health_check_timeout=1.0,
            run_command=f"{sys.executable} {script} {port} {tmp_path / 'runs'}",
        )
        messages: list[str] = []

        async with DevServer(service, tmp_path, output=io.StringIO()) as server:
            await server.start()
            await server.wait_healthy()
            task = asyncio.create_task(
                keep_running(server, ServiceGate("api", port), messages.append),
                name="test-keep-running",
            )
            try:
                await wait_until(
                    lambda: task.done() or any("healthy again" in m for m in messages),
                    "the third run is healthy",
                    limit=15,
                )

                assert not task.done()
                assert (tmp_path / "runs").read_text() == "3"
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
