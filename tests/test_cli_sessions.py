"""`up`, `down` and `status` from several terminals, with real processes.

The dev server here (`FAMILY_SERVER`) is a shell that starts a Python HTTP server, which
starts a child process of its own, so every stop must reach grandchildren. It listens on the
`PORT` that `up` sets in its environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import attrs
import pytest

from ephemwork.client.state import SessionRecord, StateStore, process_start_ticks
from ephemwork.commands.down import _stop_owner
from helpers.cli import RunningCommand, ephemwork_argv
from helpers.ports import find_free_port
from helpers.processes import live_group_members
from helpers.sshd import SshdServer
from helpers.tunnels import poll, sshd_tunnel_table
from test_end_to_end import commands, environment, get, start_bastion

FAMILY_SERVER = """
import json, os, subprocess, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"pid": os.getpid(), "child": child.pid, "name": NAME}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

NAME = sys.argv[1]
print(f"family: {NAME} up with child {child.pid}", flush=True)
ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""

# `down SERVICE` must remove the route within this many seconds.
DOWN_DEADLINE = 5.0

# Fixtures shared with the end-to-end tests.
__all__ = ["commands", "environment"]


def write_project(folder: Path, tunnel_table: str, services: tuple[str, ...] = ("api",)) -> Path:
    """Write an ephemwork.toml whose services run FAMILY_SERVER, and return the folder."""
    folder.mkdir(exist_ok=True)
    (folder / "family.py").write_text(FAMILY_SERVER, encoding="utf-8")
    tables = [tunnel_table]
    for name in services:
        tables.append(
            f"[service.{name}]\n"
            f"port = {find_free_port()}\n"
            # `echo` keeps the shell from exec-ing python, so the shell stays the leader.
            f'run_command = "echo starting {name}; {sys.executable} family.py {name}"\n'
            'health_check_path = "/health"\n'
            "health_check_timeout = 20\n"
        )
    (folder / "ephemwork.toml").write_text("\n".join(tables), encoding="utf-8")
    return folder


def local_tunnel() -> tuple[str, int]:
    proxy_port = find_free_port()
    return f'[tunnel]\ntype = "local"\nproxy_port = {proxy_port}\n', proxy_port


def start_up(
    folder: Path,
    environment: dict[str, str],
    commands: list[RunningCommand],
    *services: str,
    extra: tuple[str, ...] = (),
) -> RunningCommand:
    names = services or ("api",)
    command = RunningCommand(ephemwork_argv("up", *extra, *names), env=environment, cwd=folder)
    commands.append(command)
    for name in names:
        command.wait_for_line(rf"alice:{name} is routed to", timeout=45)
    return command


def run(folder: Path, environment: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run one ephemwork command to completion and return its result."""
    return subprocess.run(
        ephemwork_argv(*args),
        cwd=folder,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def service_port(folder: Path, name: str) -> int:
    for block in (folder / "ephemwork.toml").read_text().split("[service.")[1:]:
        if block.startswith(f"{name}]"):
            return int(block.split("port = ")[1].split("\n")[0])
    raise AssertionError(f"no service {name}")


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def route_status(proxy_port: int, route: str) -> int | None:
    try:
        return get(proxy_port, route).status
    except (OSError, http.client.HTTPException):
        return None


def state_records(environment: dict[str, str]) -> list[dict[str, object]]:
    path = Path(environment["EPHEMWORK_HOME"]) / "state.json"
    if not path.exists():
        return []
    return json.loads(path.read_text())["sessions"]  # type: ignore[no-any-return]


def dev_group(proxy_port: int, route: str) -> int:
    """Return the process group of the dev server that serves *route*."""
    reply = get(proxy_port, route)
    assert reply.status == 200, reply.body
    return os.getpgid(int(reply.json()["pid"]))  # type: ignore[arg-type]


class TestSeveralServices:
    def test_two_services_ctrl_c(
        self, tmp_path: Path, environment: dict[str, str], commands: list[RunningCommand]
    ) -> None:
        """`up api front-end`: two routes and log prefixes; Ctrl-C stops every process of both."""
        tunnel, proxy_port = local_tunnel()
        folder = write_project(tmp_path / "project", tunnel, ("api", "front-end"))
        up = start_up(folder, environment, commands, "api", "front-end")

        api = get(proxy_port, "alice:api").json()
        front = get(proxy_port, "alice:front-end").json()
        groups = [os.getpgid(int(api["pid"])), os.getpgid(int(front["pid"]))]  # type: ignore[arg-type]

        assert api["name"] == "api"
        assert front["name"] == "front-end"
        assert "api | family: api up with child" in up.output
        assert "front-end | family: front-end up with child" in up.output

        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=15) == 0
        assert "Stopped (SIGINT); routes deregistered." in up.output
        for group in groups:
            assert live_group_members(group) == []
        for name in ("api", "front-end"):
            assert port_is_free(service_port(folder, name))
        assert state_records(environment) == []


class TestDown:
    def test_down_one_of_two(
        self, tmp_path: Path, environment: dict[str, str], commands: list[RunningCommand]
    ) -> None:
        """`down api` stops only api's route and dev server; `down` then stops the rest."""
        tunnel, proxy_port = local_tunnel()
        folder = write_project(tmp_path / "project", tunnel, ("api", "front-end"))
        up = start_up(folder, environment, commands, "api", "front-end")
        api_group = dev_group(proxy_port, "alice:api")
        front_group = dev_group(proxy_port, "alice:front-end")

        started = time.monotonic()
        result = run(folder, environment, "down", "api")
        poll(lambda: route_status(proxy_port, "alice:api") == 404, DOWN_DEADLINE, "api gone")

        assert time.monotonic() - started < DOWN_DEADLINE
        assert result.returncode == 0, result.stderr
        assert result.stdout == (
            f"Stopped alice:api in `ephemwork up` (pid {up.process.pid}); it still serves "
            "alice:front-end.\n"
        )
        assert live_group_members(api_group) == []
        assert port_is_free(service_port(folder, "api"))
        assert get(proxy_port, "alice:front-end").status == 200
        assert "Stopped alice:api (ephemwork down); route deregistered." in up.output
        assert [record["service"] for record in state_records(environment)] == ["front-end"]

        result = run(folder, environment, "down")

        assert result.returncode == 0, result.stderr
        assert result.stdout == (
            f"Stopped `ephemwork up` (pid {up.process.pid}) for alice:front-end.\n"
        )
        assert up.wait(timeout=5) == 0
        assert live_group_members(front_group) == []

    def test_down_after_kill(
        self,
        tmp_path: Path,
        sshd: SshdServer,
        environment: dict[str, str],
        commands: list[RunningCommand],
    ) -> None:
        """`down` of a killed `up` stops its leftover dev server and deregisters its session."""
        bastion = start_bastion(tmp_path, environment, commands)
        folder = write_project(
            tmp_path / "project", sshd_tunnel_table(sshd, bastion.control_port, bastion.proxy_port)
        )
        up = start_up(folder, environment, commands)
        group = dev_group(bastion.proxy_port, "alice:api")
        [record] = state_records(environment)

        up.process.kill()
        up.wait(timeout=5)
        assert live_group_members(group) != [], "the dev server died with `up`"

        result = run(folder, environment, "down")

        pid = up.process.pid
        assert result.returncode == 0, result.stderr
        assert result.stdout == (
            f"`ephemwork up` (pid {pid}) for alice:api is no longer running; cleaning up after "
            "it.\n"
            f"Stopped the dev server of alice:api that `ephemwork up` (pid {pid}) left running "
            f"(process group {group}); port {service_port(folder, 'api')} is free again.\n"
            f"Deregistered alice:api (session {record['session_id']}) from the bastion.\n"
            "Removed the local record of alice:api.\n"
        )
        assert live_group_members(group) == []
        assert port_is_free(service_port(folder, "api"))
        assert get(bastion.proxy_port, "alice:api").status == 404
        assert state_records(environment) == []

    def test_up_after_kill(
        self, tmp_path: Path, environment: dict[str, str], commands: list[RunningCommand]
    ) -> None:
        """A new `up` stops the dev server that a killed `up` of the same service left."""
        tunnel, proxy_port = local_tunnel()
        folder = write_project(tmp_path / "project", tunnel)
        first = start_up(folder, environment, commands)
        group = dev_group(proxy_port, "alice:api")
        first.process.kill()
        first.wait(timeout=5)
        key_files = list(Path(environment["EPHEMWORK_HOME"]).glob("local-bastion-*.key"))

        second = start_up(folder, environment, commands)

        assert (
            f"Stopped the dev server of alice:api that `ephemwork up` (pid {first.process.pid}) "
            f"left running (process group {group})" in second.output
        )
        assert live_group_members(group) == []
        assert len(key_files) == 1
        assert not key_files[0].exists()
        assert get(proxy_port, "alice:api").status == 200
        second.send_signal(signal.SIGINT)
        assert second.wait(timeout=15) == 0

    def test_reused_group_spared(
        self, tmp_path: Path, environment: dict[str, str], commands: list[RunningCommand]
    ) -> None:
        """A stale record whose group id now belongs to another process signals nothing."""
        tunnel, _proxy_port = local_tunnel()
        folder = write_project(tmp_path / "project", tunnel)
        bystander = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
        )
        try:
            home = Path(environment["EPHEMWORK_HOME"])
            home.mkdir(mode=0o700)
            (home / "state.json").write_text(
                json.dumps(
                    {
                        "version": 1,
                        "sessions": [
                            {
                                "user": "alice",
                                "service": "api",
                                "local_port": service_port(folder, "api"),
                                "bastion_port": 0,
                                "session_id": "",
                                "pid": 999999,
                                "pid_start_ticks": None,
                                "started_at": 0.0,
                                "tunnel": "",
                                "state": "serving",
                                "dev_pgid": bystander.pid,
                                "dev_start_ticks": 1,
                                "dev_marker": "not-the-bystander",
                            }
                        ],
                    }
                )
            )

            result = run(folder, environment, "down", "api")

            assert result.returncode == 0, result.stderr
            assert "Stopped the dev server" not in result.stdout
            assert bystander.poll() is None
        finally:
            bystander.kill()
            bystander.wait()

    def test_unproven_pid_spared(
        self, tmp_path: Path, environment: dict[str, str], commands: list[RunningCommand]
    ) -> None:
        """A record without the start time of its live pid, as after a reboot, signals nothing."""
        tunnel, _proxy_port = local_tunnel()
        folder = write_project(tmp_path / "project", tunnel)
        bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            home = Path(environment["EPHEMWORK_HOME"])
            home.mkdir(mode=0o700)
            record = {
                "user": "alice",
                "service": "api",
                "local_port": service_port(folder, "api"),
                "bastion_port": 0,
                "session_id": "",
                "pid": bystander.pid,
                "pid_start_ticks": None,
                "started_at": 0.0,
                "tunnel": "",
                "state": "serving",
            }
            (home / "state.json").write_text(json.dumps({"version": 1, "sessions": [record]}))

            result = run(folder, environment, "down", "api")

            assert result.returncode == 0, result.stderr
            assert "it is not signalled" in result.stdout
            assert bystander.poll() is None
            assert state_records(environment) == []
        finally:
            bystander.kill()
            bystander.wait()

    def test_record_changed_between_reads(self, tmp_path: Path) -> None:
        """A record that `up` updates while `down` reads it is not counted as another service."""
        # A stand-in for `up` whose SIGTERM ends it; the real `up` is not needed to compare records.
        owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            store = StateStore(tmp_path)
            record = SessionRecord(
                user="alice",
                service="api",
                local_port=8000,
                bastion_port=20000,
                session_id="s1",
                pid=owner.pid,
                pid_start_ticks=process_start_ticks(owner.pid),
                started_at=time.time(),
                tunnel="t",
                state="serving",
            )
            store.add(attrs.evolve(record, last_error="12:00:00 SSH connection lost"))

            output = io.StringIO()
            with contextlib.redirect_stdout(output):
                asyncio.run(_stop_owner(store, owner.pid, [record]))

            assert f"Stopped `ephemwork up` (pid {owner.pid}) for alice:api." in output.getvalue()
            assert "still serves" not in output.getvalue()
        finally:
            owner.kill()
            owner.wait()


class TestSecondUp:
    def test_second_up_rejected(
        self, tmp_path: Path, environment: dict[str, str], commands: list[RunningCommand]
    ) -> None:
        """A second `up` of the same service fails with the first one's pid and start time."""
        tunnel, proxy_port = local_tunnel()
        folder = write_project(tmp_path / "project", tunnel)
        first = start_up(folder, environment, commands)
        [record] = state_records(environment)
        started = time.strftime(
            "%Y-%m-%d %H:%M:%S",
            time.localtime(record["started_at"]),  # type: ignore[arg-type]
        )

        result = run(folder, environment, "up", "api")

        assert result.returncode == 2
        assert result.stderr == (
            f"error: alice:api is already served by `ephemwork up` (pid {first.process.pid}, "
            f"started {started}). Stop it with `ephemwork down api`, or pass --takeover to "
            "replace it.\n"
        )
        assert get(proxy_port, "alice:api").status == 200
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=15) == 0

    def test_takeover(
        self, tmp_path: Path, environment: dict[str, str], commands: list[RunningCommand]
    ) -> None:
        """`up --takeover` stops the running `up` and serves the route itself."""
        tunnel, proxy_port = local_tunnel()
        folder = write_project(tmp_path / "project", tunnel)
        first = start_up(folder, environment, commands)
        first_group = dev_group(proxy_port, "alice:api")

        second = start_up(folder, environment, commands, extra=("--takeover",))

        assert first.wait(timeout=5) == 0
        assert live_group_members(first_group) == []
        assert dev_group(proxy_port, "alice:api") != first_group
        [record] = state_records(environment)
        assert record["pid"] == second.process.pid
        second.send_signal(signal.SIGINT)
        assert second.wait(timeout=15) == 0


class TestLocalState:
    def test_truncated_state_file(self, tmp_path: Path, environment: dict[str, str]) -> None:
        """A truncated state file is moved aside with a warning, and the command goes on."""
        home = Path(environment["EPHEMWORK_HOME"])
        home.mkdir(mode=0o700)
        (home / "state.json").write_text('{"version": 1, "sessions": [{"user": "al')

        result = run(tmp_path, environment, "status")

        [moved] = home.glob("state.json.corrupt-*")
        assert result.returncode == 0
        assert result.stdout == (
            "No sessions for user alice. Start one with `ephemwork up SERVICE`.\n"
        )
        assert result.stderr.startswith(
            f"warning: the local state file {str(home / 'state.json')!r} is damaged ("
        )
        assert result.stderr.endswith(f"); moved it to {str(moved)!r} and continued without it.\n")


class TestUpMessages:
    def test_proxy_port_busy(
        self, tmp_path: Path, environment: dict[str, str], commands: list[RunningCommand]
    ) -> None:
        """A busy local proxy port fails before any dev server starts, naming its holder."""
        tunnel, proxy_port = local_tunnel()
        folder = write_project(tmp_path / "project", tunnel)
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import socket, sys, time; s = socket.socket(); "
                f"s.bind(('127.0.0.1', {proxy_port})); s.listen(); print('ready', flush=True); "
                "time.sleep(60)",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None
            holder.stdout.readline()

            result = run(folder, environment, "up", "api")
        finally:
            holder.kill()
            holder.communicate()

        command = " ".join(holder.args)  # type: ignore[arg-type]
        assert result.returncode == 2
        assert result.stdout == ""
        assert result.stderr == (
            f"error: Port {proxy_port} on 127.0.0.1 (tunnel.proxy_port) is already in use by "
            f"process {holder.pid} ({command!r}). Stop that process, or set tunnel.proxy_port "
            f"in {folder / 'ephemwork.toml'} to a free port.\n"
        )

    def test_stopped_before_route(
        self, tmp_path: Path, environment: dict[str, str], commands: list[RunningCommand]
    ) -> None:
        """Ctrl-C during the health check reports that only the dev server was stopped."""
        tunnel, _proxy_port = local_tunnel()
        folder = tmp_path / "project"
        folder.mkdir()
        (folder / "ephemwork.toml").write_text(
            f"{tunnel}\n[service.api]\nport = {find_free_port()}\n"
            'run_command = "echo waiting; sleep 60"\n',
            encoding="utf-8",
        )
        up = RunningCommand(ephemwork_argv("up", "api"), env=environment, cwd=folder)
        commands.append(up)
        up.wait_for_line(r"api \| waiting")

        up.send_signal(signal.SIGINT)

        assert up.wait(timeout=15) == 0
        assert up.lines[-1] == (
            "Stopped (SIGINT) before any route was registered; stopped the dev server of api.\n"
        )

    def test_identity_file_missing(self, tmp_path: Path, environment: dict[str, str]) -> None:
        """A missing identity file exits 2 before any dev server starts."""
        folder = tmp_path / "project"
        folder.mkdir()
        started = folder / "started"
        (folder / "ephemwork.toml").write_text(
            '[tunnel]\ntype = "ssh"\nhost = "127.0.0.1"\nport = 9\n'
            f'identity_file = "{folder / "nokey"}"\n'
            f"[service.api]\nport = {find_free_port()}\n"
            f'run_command = "touch {started}; sleep 60"\n',
            encoding="utf-8",
        )

        result = run(folder, environment, "up", "api")

        assert result.returncode == 2
        assert result.stderr == (
            f"error: The identity file {str(folder / 'nokey')!r} for 127.0.0.1:9 does not "
            "exist. Fix the path in the [tunnel] table of ephemwork.toml.\n"
        )
        assert not started.exists()

    def test_port_in_environment(
        self, tmp_path: Path, environment: dict[str, str], commands: list[RunningCommand]
    ) -> None:
        """PORT is the service's port unless env sets it; the family server relies on it."""
        tunnel, _proxy_port = local_tunnel()
        folder = tmp_path / "project"
        folder.mkdir()
        port = find_free_port()
        (folder / "ephemwork.toml").write_text(
            f"{tunnel}\n"
            f"[service.api]\nport = {port}\n"
            'run_command = "echo port=$PORT other=$OTHER; sleep 60"\n'
            f"[service.web]\nport = {find_free_port()}\n"
            'run_command = "echo port=$PORT; sleep 60"\n'
            'env = { PORT = "1234" }\n',
            encoding="utf-8",
        )
        for name, expected in (("api", f"port={port} other="), ("web", "port=1234")):
            up = RunningCommand(ephemwork_argv("up", name), env=environment, cwd=folder)
            commands.append(up)
            line = up.wait_for_line(rf"{name} \| port=")
            assert line.string.strip() == f"{name} | {expected}".strip()
            up.send_signal(signal.SIGINT)
            assert up.wait(timeout=15) == 0


@pytest.mark.usefixtures("commands")
class TestStatus:
    def test_connected(
        self, tmp_path: Path, environment: dict[str, str], commands: list[RunningCommand]
    ) -> None:
        """With a working route, status shows connected after a probe through the bastion."""
        tunnel, _proxy_port = local_tunnel()
        folder = write_project(tmp_path / "project", tunnel)
        up = start_up(folder, environment, commands)

        table = run(folder, environment, "status")
        document = json.loads(run(folder, environment, "status", "--json").stdout)

        [header, row] = table.stdout.splitlines()
        assert header.split() == [
            "SERVICE",
            "HEADER",
            "LOCAL",
            "PORT",
            "BASTION",
            "PORT",
            "LOCAL",
            "BASTION",
            "STATE",
            "UPTIME",
            "LAST",
            "ERROR",
        ]
        assert row.split()[4:7] == ["serving", "registered", "connected"]
        [session] = document["sessions"]
        assert session["state"] == "connected"
        assert session["pid"] == up.process.pid
        assert session["probe"]["from_laptop"] is True
        assert session["probe"]["status"] == 200
        assert session["bastion_port"] == session["bastion_reported_port"]
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=15) == 0

    def test_broken_route(
        self,
        tmp_path: Path,
        sshd: SshdServer,
        environment: dict[str, str],
        commands: list[RunningCommand],
    ) -> None:
        """A registered route whose laptop does not respond is reported broken, not connected."""
        bastion = start_bastion(tmp_path, environment, commands)
        folder = write_project(
            tmp_path / "project", sshd_tunnel_table(sshd, bastion.control_port, bastion.proxy_port)
        )
        up = start_up(folder, environment, commands)

        os.kill(up.process.pid, signal.SIGSTOP)
        try:
            document = json.loads(run(folder, environment, "status", "--json").stdout)
        finally:
            os.kill(up.process.pid, signal.SIGCONT)

        [session] = document["sessions"]
        assert session["bastion_state"] == "registered"
        assert session["state"] == "broken"
        assert session["probe"]["from_laptop"] is False
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=15) == 0

    def test_stale_entry(
        self,
        tmp_path: Path,
        sshd: SshdServer,
        environment: dict[str, str],
        commands: list[RunningCommand],
    ) -> None:
        """After `kill -9` of `up`, status marks the entry stale next to the bastion's view."""
        bastion = start_bastion(tmp_path, environment, commands)
        folder = write_project(
            tmp_path / "project", sshd_tunnel_table(sshd, bastion.control_port, bastion.proxy_port)
        )
        up = start_up(folder, environment, commands)
        up.process.kill()
        up.wait(timeout=5)

        table = run(folder, environment, "status")
        document = json.loads(run(folder, environment, "status", "--json").stdout)
        run(folder, environment, "down")

        [session] = document["sessions"]
        assert session["local_state"] == "stale"
        assert session["bastion_state"] == "registered"
        assert session["state"] == "stale"
        assert session["probe"] is None
        assert "the bastion still routes it until its lease expires" in table.stdout
