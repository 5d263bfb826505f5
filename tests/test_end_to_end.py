"""The whole request path with real processes: bastion, SSH server, `ephemwork up`, dev server.

Each test starts `ephemwork up` as a subprocess with a real dev server (examples/hello), sends
requests to the bastion's proxy with and without the route header, then stops `up` with
SIGINT, as Ctrl-C would, and checks that the route and the dev server's processes are gone.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest

from helpers.cli import RunningCommand, base_environment, ephemwork_argv
from helpers.ports import find_free_port
from helpers.processes import live_group_members
from helpers.repo import REPO_ROOT
from helpers.sshd import SshdServer
from helpers.tunnels import ssh_tunnel_table, sshd_tunnel_table

HELLO_SERVER = REPO_ROOT / "examples" / "hello" / "server.py"

# `up` must stop its route within this many seconds of Ctrl-C.
STOP_DEADLINE = 5.0


@attrs.frozen
class Reply:
    status: int
    body: bytes

    def json(self) -> dict[str, object]:
        return json.loads(self.body)  # type: ignore[no-any-return]


def get(port: int, route: str | None, path: str = "/") -> Reply:
    """Send a GET to the proxy on 127.0.0.1:*port*, with ``X-Ephemwork: route`` if given."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if route is not None:
        request.add_header("X-Ephemwork", route)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return Reply(response.status, response.read())
    except urllib.error.HTTPError as error:
        return Reply(error.code, error.read())


def free_port_block(size: int = 20) -> tuple[int, int]:
    """Return a range of ports above an ephemeral free port, for the bastion's tunnels."""
    low = find_free_port()
    low = 30000 + low % 20000
    return low, low + size - 1


@attrs.frozen
class Bastion:
    proxy_port: int
    control_port: int
    command: RunningCommand


@pytest.fixture
def project(tmp_path: Path) -> Callable[[str], Path]:
    """Return a function that writes a project with a hello service and the given [tunnel]."""

    def write(tunnel_table: str) -> Path:
        folder = tmp_path / "project"
        folder.mkdir(exist_ok=True)
        shutil.copy(HELLO_SERVER, folder / "server.py")
        dev_port = find_free_port()
        (folder / "ephemwork.toml").write_text(
            f"{tunnel_table}\n"
            "[service.hello]\n"
            f"port = {dev_port}\n"
            f'run_command = "{sys.executable} server.py"\n'
            'health_check_path = "/health"\n'
            f'env = {{ PORT = "{dev_port}" }}\n',
            encoding="utf-8",
        )
        return folder

    return write


@pytest.fixture
def environment(tmp_path: Path) -> dict[str, str]:
    """An environment with its own EPHEMWORK_HOME and EPHEMWORK_USER=alice."""
    return base_environment(tmp_path / "home")


@pytest.fixture
def commands() -> Iterator[list[RunningCommand]]:
    """Commands started by a test; their process groups are killed if they outlive it."""
    started: list[RunningCommand] = []
    yield started
    for command in started:
        command.kill_group()
        # Shown by pytest only when the test fails.
        print(f"--- output of {command.process.args}:\n{command.output}")


def start_bastion(
    tmp_path: Path,
    environment: dict[str, str],
    commands: list[RunningCommand],
    *extra: str,
) -> Bastion:
    proxy_port = find_free_port()
    control_port = find_free_port()
    low, high = free_port_block()
    command = RunningCommand(
        ephemwork_argv(
            "--log-format",
            "json",
            "serve-bastion",
            "--listen",
            f"127.0.0.1:{proxy_port}",
            "--control-listen",
            f"127.0.0.1:{control_port}",
            "--port-range",
            f"{low}-{high}",
            "--state-dir",
            str(tmp_path / "bastion-state"),
            *extra,
        ),
        env=environment,
    )
    commands.append(command)
    command.wait_for_line(r'"event": ?"bastion.started"')
    return Bastion(proxy_port, control_port, command)


def start_up(
    project_folder: Path,
    environment: dict[str, str],
    commands: list[RunningCommand],
    pyz: Path | None = None,
) -> RunningCommand:
    command = RunningCommand(
        ephemwork_argv("up", "hello", pyz=pyz), env=environment, cwd=project_folder
    )
    commands.append(command)
    command.wait_for_line(r"alice:hello is routed to", timeout=45)
    return command


def route_is_gone(proxy_port: int, *, bastion_stays: bool) -> bool:
    """Return whether the proxy no longer routes ``alice:hello``.

    A bastion that outlives `up` must answer 404; a local-mode bastion stops with `up`, so
    a refused or cut connection also means the route is gone.
    """
    try:
        return get(proxy_port, "alice:hello").status == 404
    except (ConnectionError, http.client.HTTPException, urllib.error.URLError):
        if bastion_stays:
            raise
        return True


def check_route_lifecycle(
    up: RunningCommand, proxy_port: int, *, bastion_stays: bool = True
) -> None:
    """Check routing through *proxy_port*, then Ctrl-C and what must be gone afterwards."""
    routed = get(proxy_port, "alice:hello", "/orders?id=7")
    assert routed.status == 200
    assert routed.json()["served_by"] == "laptop"
    assert routed.json()["path"] == "/orders"
    assert routed.json()["headers"]["X-Ephemwork"] == "alice:hello"  # type: ignore[index]

    without_header = get(proxy_port, None)
    assert without_header.status == 404
    unknown = get(proxy_port, "bob:hello")
    assert unknown.status == 404
    assert b"bob:hello" in unknown.body

    dev_server_group = os.getpgid(int(routed.json()["pid"]))  # type: ignore[arg-type]
    assert dev_server_group != os.getpgid(up.process.pid)

    stopped_at = time.monotonic()
    up.send_signal(signal.SIGINT)
    while not route_is_gone(proxy_port, bastion_stays=bastion_stays):
        assert time.monotonic() - stopped_at < STOP_DEADLINE, "route still answers after Ctrl-C"
        time.sleep(0.05)
    assert up.wait(timeout=STOP_DEADLINE) == 0

    assert live_group_members(dev_server_group) == []


class TestOpenSshBastion:
    def test_route_through_openssh(
        self,
        tmp_path: Path,
        sshd: SshdServer,
        project: Callable[[str], Path],
        environment: dict[str, str],
        commands: list[RunningCommand],
    ) -> None:
        """A request with the header reaches the dev server through OpenSSH's reverse forward."""
        bastion = start_bastion(tmp_path, environment, commands)
        folder = project(sshd_tunnel_table(sshd, bastion.control_port, bastion.proxy_port))

        up = start_up(folder, environment, commands)

        check_route_lifecycle(up, bastion.proxy_port)


class TestEmbeddedSshServer:
    def test_route_through_embedded_server(
        self,
        tmp_path: Path,
        sshd: SshdServer,
        project: Callable[[str], Path],
        environment: dict[str, str],
        commands: list[RunningCommand],
    ) -> None:
        """`serve-bastion --dev` carries the route through its own asyncssh server."""
        # The OpenSSH fixture's client key is reused; only the server differs.
        authorized_keys = tmp_path / "authorized_keys"
        authorized_keys.write_text(
            Path(f"{sshd.client_key_path}.pub").read_text(encoding="utf-8"), encoding="utf-8"
        )
        host_key = tmp_path / "bastion_host_key"
        shutil.copy(sshd.client_key_path, host_key)
        ssh_port = find_free_port()
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(
            f"[127.0.0.1]:{ssh_port} "
            + " ".join(Path(f"{sshd.client_key_path}.pub").read_text().split()[:2])
            + "\n",
            encoding="utf-8",
        )

        bastion = start_bastion(
            tmp_path,
            environment,
            commands,
            "--dev",
            "--ssh-listen",
            f"127.0.0.1:{ssh_port}",
            "--authorized-keys",
            str(authorized_keys),
            "--host-key",
            str(host_key),
        )
        folder = project(
            ssh_tunnel_table(
                port=ssh_port,
                user="alice",
                identity_file=sshd.client_key_path,
                known_hosts=known_hosts,
                control_port=bastion.control_port,
                proxy_port=bastion.proxy_port,
            )
        )

        up = start_up(folder, environment, commands)

        check_route_lifecycle(up, bastion.proxy_port)


class TestLocalMode:
    def test_route_in_local_mode(
        self,
        project: Callable[[str], Path],
        environment: dict[str, str],
        commands: list[RunningCommand],
    ) -> None:
        """`up` alone runs a bastion in-process and routes through a real SSH forward."""
        proxy_port = find_free_port()
        folder = project(f'[tunnel]\ntype = "local"\nproxy_port = {proxy_port}\n')

        up = start_up(folder, environment, commands)

        check_route_lifecycle(up, proxy_port, bastion_stays=False)

    def test_route_through_zipapp(
        self,
        pyz_path: Path,
        project: Callable[[str], Path],
        environment: dict[str, str],
        commands: list[RunningCommand],
    ) -> None:
        """The zipapp built by scripts/build_pyz.sh serves the same route in local mode."""
        proxy_port = find_free_port()
        folder = project(f'[tunnel]\ntype = "local"\nproxy_port = {proxy_port}\n')

        up = start_up(folder, environment, commands, pyz=pyz_path)

        check_route_lifecycle(up, proxy_port, bastion_stays=False)
