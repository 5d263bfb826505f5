"""`ephemwork up` with real processes when the SSH connection breaks and the dev server crashes.

The dev server here (`FLAKY_SERVER`) counts its starts in a file, crashes on request or at
chosen starts, and streams slow responses, so a test can hold long requests open across a
lost connection.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import asyncssh
import pytest

from ephemwork.wire import PROTOCOL_HEADER, PROTOCOL_VERSION
from helpers.cli import RunningCommand, ephemwork_argv
from helpers.ports import find_free_port
from helpers.sshd import SshdServer, _descendants
from helpers.tunnels import poll, ssh_tunnel_table, sshd_tunnel_table
from test_end_to_end import Bastion, commands, environment, get, start_bastion

FLAKY_SERVER = """
import os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

runs_file = "runs.txt"
run = int(open(runs_file).read()) + 1 if os.path.exists(runs_file) else 1
open(runs_file, "w").write(str(run))
print(f"flaky: start {run}", flush=True)
if str(run) in os.environ.get("CRASH_ON_START", "").split(","):
    print("SyntaxError: simulated", flush=True)
    sys.exit(1)

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/crash":
            print("boom: crash requested", flush=True)
            os._exit(3)
        if self.path == "/stream":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(300):
                self.wfile.write(b"2\\r\\nx\\n\\r\\n")
                self.wfile.flush()
                time.sleep(0.1)
            self.wfile.write(b"0\\r\\n\\r\\n")
            return
        body = f"run {run} pid {os.getpid()}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""

# The time from the bastion being reachable again to the route answering.
RECONNECT_LIMIT = 5.0

# Fixtures shared with the end-to-end tests.
__all__ = ["commands", "environment"]


def write_project(folder: Path, tunnel_table: str, crash_on_start: str = "") -> Path:
    """Write an ephemwork.toml with one `flaky` service and return the folder."""
    folder.mkdir(exist_ok=True)
    (folder / "flaky.py").write_text(FLAKY_SERVER, encoding="utf-8")
    dev_port = find_free_port()
    (folder / "ephemwork.toml").write_text(
        f"{tunnel_table}\n"
        "[service.flaky]\n"
        f"port = {dev_port}\n"
        f'run_command = "{sys.executable} flaky.py"\n'
        'health_check_path = "/health"\n'
        "health_check_timeout = 10\n"
        f'env = {{ PORT = "{dev_port}", CRASH_ON_START = "{crash_on_start}" }}\n',
        encoding="utf-8",
    )
    return folder


def start_up(
    folder: Path, environment: dict[str, str], commands: list[RunningCommand]
) -> RunningCommand:
    command = RunningCommand(ephemwork_argv("up", "flaky"), env=environment, cwd=folder)
    commands.append(command)
    command.wait_for_line(r"alice:flaky is routed to", timeout=45)
    return command


def answers(proxy_port: int, status: int, text: str = "") -> Callable[[], bool]:
    def check() -> bool:
        try:
            reply = get(proxy_port, "alice:flaky")
        except (OSError, http.client.HTTPException):
            return False
        return reply.status == status and text.encode() in reply.body

    return check


class StreamClient:
    """A long response read in a thread; `ended` is set when the stream stops for any reason."""

    def __init__(self, proxy_port: int) -> None:
        self.received = 0
        self.error: str | None = None
        self.ended = threading.Event()
        self.started = threading.Event()
        self._port = proxy_port
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self._port, timeout=30)
        try:
            connection.request("GET", "/stream", headers={"X-Ephemwork": "alice:flaky"})
            response = connection.getresponse()
            while chunk := response.read1(64):
                self.received += len(chunk)
                self.started.set()
        except (OSError, http.client.HTTPException) as error:
            self.error = type(error).__name__
        finally:
            connection.close()
            self.ended.set()


class TestConnectionLoss:
    def test_sshd_child_killed(
        self,
        tmp_path: Path,
        sshd: SshdServer,
        environment: dict[str, str],
        commands: list[RunningCommand],
    ) -> None:
        """Killing sshd's connection process: `up` reconnects on the same port within 5 s."""
        bastion = start_bastion(tmp_path, environment, commands)
        folder = write_project(
            tmp_path / "project",
            sshd_tunnel_table(sshd, bastion.control_port, bastion.proxy_port),
        )
        up = start_up(folder, environment, commands)
        before = get(bastion.proxy_port, "alice:flaky")
        long_requests = [StreamClient(bastion.proxy_port), StreamClient(bastion.proxy_port)]
        for client in long_requests:
            assert client.started.wait(10), "the long request never started streaming"

        for pid in _descendants(sshd.process.pid):
            os.kill(pid, signal.SIGKILL)
        cut_at = time.monotonic()

        up.wait_for_line(r"Lost the SSH connection to ssh ", timeout=15)
        poll(answers(bastion.proxy_port, 200, "run 1"), RECONNECT_LIMIT, "route back after the cut")
        back = up.wait_for_line(r"alice:flaky is routed again through bastion port (\d+)")
        after = get(bastion.proxy_port, "alice:flaky")

        print(f"route back {time.monotonic() - cut_at:.2f} s after the cut")
        assert time.monotonic() - cut_at < RECONNECT_LIMIT
        assert after.body == before.body, "the dev server was restarted"
        assert up.output.count("Lost the SSH connection") == 1
        sessions = _bastion_ports(bastion.command)
        assert sessions == [int(back.group(1))], "the reconnect registered another session"
        for client in long_requests:
            assert client.ended.wait(10), "a long request hung after the connection was cut"
            assert client.received > 0

        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=10) == 0


def _bastion_ports(bastion: RunningCommand) -> list[int]:
    """Return the ports of every session the bastion registered, in order."""
    ports = []
    for line in bastion.lines:
        if '"control.session_registered"' in line:
            ports.append(json.loads(line)["port"])
    return ports


class TestDevServerCrash:
    def test_crash_then_restart(
        self,
        tmp_path: Path,
        environment: dict[str, str],
        commands: list[RunningCommand],
    ) -> None:
        """A dev server that crashes twice: 502 naming it while down, 200 once it is back."""
        proxy_port = find_free_port()
        folder = write_project(
            tmp_path / "project",
            f'[tunnel]\ntype = "local"\nproxy_port = {proxy_port}\n',
            crash_on_start="2",
        )
        up = start_up(folder, environment, commands)

        try:
            get(proxy_port, "alice:flaky", "/crash")
        except (OSError, http.client.HTTPException):
            pass

        poll(
            answers(proxy_port, 502, "the dev server on the laptop is not running"),
            5,
            "502 while the dev server is down",
        )
        poll(answers(proxy_port, 200, "run 3"), 20, "200 after the second restart")

        assert "flaky: the dev server exited with code 3." in up.output
        assert "boom: crash requested" in up.output
        assert "SyntaxError: simulated" in up.output
        assert "flaky: the dev server is healthy again" in up.output

        status = subprocess.run(
            ephemwork_argv("status", "--json"),
            env=environment,
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert status.returncode == 0, status.stderr
        (session,) = json.loads(status.stdout)["sessions"]
        assert session["last_error"].endswith("the dev server exited with code 3")

        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=10) == 0


def _control_sessions(control_port: int) -> list[dict[str, object]]:
    """Return every session the bastion's control API lists."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{control_port}/v1/sessions",
        headers={PROTOCOL_HEADER: str(PROTOCOL_VERSION)},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["sessions"]  # type: ignore[no-any-return]


class TestBastionRestart:
    @pytest.mark.parametrize("keep_registry", [True, False], ids=["registry-kept", "registry-lost"])
    def test_dev_bastion_restarted(
        self,
        tmp_path: Path,
        environment: dict[str, str],
        commands: list[RunningCommand],
        keep_registry: bool,
    ) -> None:
        """`serve-bastion --dev` restarted under `up`: the route comes back as one session."""
        client_key = asyncssh.generate_private_key("ssh-ed25519")
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        (tmp_path / "client_key").write_bytes(client_key.export_private_key())
        (tmp_path / "client_key").chmod(0o600)
        (tmp_path / "host_key").write_bytes(host_key.export_private_key())
        (tmp_path / "authorized_keys").write_bytes(client_key.export_public_key())
        ssh_port = find_free_port()
        (tmp_path / "known_hosts").write_bytes(
            f"[127.0.0.1]:{ssh_port} ".encode() + host_key.export_public_key()
        )
        dev_flags = (
            "--dev",
            "--ssh-listen",
            f"127.0.0.1:{ssh_port}",
            "--authorized-keys",
            str(tmp_path / "authorized_keys"),
            "--host-key",
            str(tmp_path / "host_key"),
        )
        bastion = start_bastion(tmp_path, environment, commands, *dev_flags)
        folder = write_project(
            tmp_path / "project",
            ssh_tunnel_table(
                port=ssh_port,
                user="alice",
                identity_file=tmp_path / "client_key",
                known_hosts=tmp_path / "known_hosts",
                control_port=bastion.control_port,
                proxy_port=bastion.proxy_port,
            ),
        )
        up = start_up(folder, environment, commands)
        [before] = _control_sessions(bastion.control_port)

        bastion.command.send_signal(signal.SIGTERM)
        assert bastion.command.wait(timeout=10) == 0
        if not keep_registry:
            shutil.rmtree(tmp_path / "bastion-state")
        up.wait_for_line(r"Lost the SSH connection to ssh ", timeout=15)
        restarted = _restart_bastion(bastion, commands, environment)

        poll(answers(bastion.proxy_port, 200, "run 1"), 10, "route back after the restart")
        sessions = _control_sessions(bastion.control_port)

        assert len(sessions) == 1
        assert sessions[0]["port"] == before["port"]
        if keep_registry:
            # The bastion lists sessions without their ids; the registration time is kept.
            assert sessions[0]["registered_at"] == before["registered_at"]
        registered_again = '"control.session_registered"' in restarted.output
        assert registered_again is not keep_registry
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=10) == 0


def _restart_bastion(
    bastion: Bastion, commands: list[RunningCommand], environment: dict[str, str]
) -> RunningCommand:
    """Start serve-bastion again with the arguments of *bastion*'s command."""
    argv = [str(part) for part in bastion.command.process.args]  # type: ignore[union-attr]
    command = RunningCommand(argv, env=environment)
    commands.append(command)
    command.wait_for_line(r'"event": ?"bastion.started"')
    return command
