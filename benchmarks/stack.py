"""The parts under test, started on 127.0.0.1: backends, sshd, the reference paths, ephemwork.

Routes use ``X-Ephemwork: <user>:<backend>``. The reference nginx routes the users ``sshn``
(tunnels held by ``ssh -N -R``) and ``sshtt`` (``ssh -tt -R … sleep``); ephemwork serves the
user ``bench`` through ``ephemwork up``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import attrs
from processes import Child, Processes, free_port_range, free_ports, wait_for_port, wait_for_text

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

from helpers.sshd import SshdServer, start_sshd  # noqa: E402

# memory.py imports SshdServer from here, because this module puts tests/ on sys.path.
__all__ = ["SshdServer"]

BACKENDS = ("fast", "uvicorn")
EPHEMWORK_USER = "bench"
# The ephemwork source that the bastion and `up` import; `use_source` can point it at an
# export of one commit.
source_dir = REPO_ROOT / "src"
# The reference ssh clients end by themselves after this many seconds.
SSH_HOLD_SECONDS = 3600


@attrs.frozen
class Backends:
    fast_port: int
    uvicorn_port: int
    uvicorn_pid: int

    def port(self, backend: str) -> int:
        return self.fast_port if backend == "fast" else self.uvicorn_port


@attrs.frozen
class Reference:
    """nginx on ``proxy_port`` and the tunnel ports the two ssh clients hold."""

    proxy_port: int
    # (user, backend) -> tunnel port on sshd's side
    tunnel_ports: dict[tuple[str, str], int]
    nginx: Child
    ssh_n: Child
    ssh_tt: Child


@attrs.frozen
class Ephemwork:
    proxy_port: int
    control_port: int
    bastion: Child
    # None when only the bastion was started (the memory measurements).
    up: Child | None
    tunnel_ports: dict[str, int]


def start_backends(processes: Processes, work: Path) -> Backends:
    """Start nginx returning ``200 hello`` (the fast backend) and the uvicorn app."""
    fast_port, uvicorn_port = free_ports(2)
    conf = _nginx_conf(
        work / "nginx-fast",
        f"""
        server {{
            listen 127.0.0.1:{fast_port};
            keepalive_requests 1000000;
            location / {{ return 200 "hello\\n"; }}
        }}
        """,
    )
    fast = processes.start("backend-fast", ["nginx", "-p", str(conf.parent), "-c", str(conf)])
    wait_for_port(fast_port, fast)

    uvicorn = processes.start(
        "backend-uvicorn",
        [
            sys.executable,
            "-m",
            "uvicorn",
            "backends.uvicorn_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(uvicorn_port),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        cwd=BENCH_DIR,
    )
    wait_for_port(uvicorn_port, uvicorn)
    return Backends(fast_port, uvicorn_port, uvicorn.pid)


def start_bench_sshd(work: Path) -> SshdServer:
    """Start OpenSSH sshd with its own keys; pty sessions and forwarding allowed."""
    return start_sshd(work / "sshd", {"PermitTTY": "yes", "LogLevel": "ERROR"})


def start_reference(
    processes: Processes, work: Path, sshd: SshdServer, backends: Backends
) -> Reference:
    """Start the two OpenSSH clients and nginx routing on the header to their tunnels."""
    ports = free_ports(5)
    proxy_port = ports[0]
    tunnel_ports = {
        ("sshn", "fast"): ports[1],
        ("sshn", "uvicorn"): ports[2],
        ("sshtt", "fast"): ports[3],
        ("sshtt", "uvicorn"): ports[4],
    }

    def forwards(user: str) -> list[str]:
        args = []
        for backend in BACKENDS:
            remote = tunnel_ports[(user, backend)]
            args += ["-R", f"127.0.0.1:{remote}:127.0.0.1:{backends.port(backend)}"]
        return args

    ssh_n = processes.start("ssh-N", [*_ssh_argv(sshd), "-N", *forwards("sshn"), _login(sshd)])
    ssh_tt = processes.start(
        "ssh-tt",
        [*_ssh_argv(sshd), "-tt", *forwards("sshtt"), _login(sshd), f"sleep {SSH_HOLD_SECONDS}"],
    )
    for (user, _backend), port in tunnel_ports.items():
        wait_for_port(port, ssh_n if user == "sshn" else ssh_tt)

    # The first map names the route's tunnel port, the second the upstream block for that
    # port, so nginx can keep idle connections to each tunnel open (keepalive).
    port_map = "\n".join(f'"{u}:{b}" {p};' for (u, b), p in tunnel_ports.items())
    upstream_map = "\n".join(f"{p} tunnel_{p};" for p in tunnel_ports.values())
    upstreams = "\n".join(
        f"upstream tunnel_{p} {{ server 127.0.0.1:{p}; keepalive 128; }}"
        for p in tunnel_ports.values()
    )
    conf = _nginx_conf(
        work / "nginx-reference",
        f"""
        map $http_x_ephemwork $tunnel_port {{
            default "";
            {port_map}
        }}
        map $tunnel_port $tunnel_upstream {{
            default "";
            {upstream_map}
        }}
        {upstreams}
        server {{
            listen 127.0.0.1:{proxy_port};
            keepalive_requests 1000000;
            location / {{
                if ($tunnel_upstream = "") {{ return 404; }}
                proxy_pass http://$tunnel_upstream;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
                proxy_buffering off;
                proxy_request_buffering off;
            }}
        }}
        """,
    )
    nginx = processes.start("nginx-reference", ["nginx", "-p", str(conf.parent), "-c", str(conf)])
    wait_for_port(proxy_port, nginx)
    return Reference(proxy_port, tunnel_ports, nginx, ssh_n, ssh_tt)


def start_ephemwork(
    processes: Processes,
    work: Path,
    sshd: SshdServer,
    backends: Backends,
    levers: str,
    *,
    name: str,
    start_up: bool = True,
    source: Path | None = None,
) -> Ephemwork:
    """Start ``serve-bastion`` and, if *start_up*, ``ephemwork up fast uvicorn``.

    *source* is the ``src`` folder to run ephemwork from; None means the harness's default.
    """
    proxy_port, control_port = free_ports(2)
    low, high = free_port_range(200)
    folder = work / f"ephemwork-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    env = ephemwork_env(folder, levers, source)

    bastion = processes.start(
        f"bastion-{name}",
        [
            sys.executable,
            str(BENCH_DIR / "launch.py"),
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
            str(folder / "bastion-state"),
        ],
        env=env,
    )
    wait_for_port(proxy_port, bastion)
    wait_for_port(control_port, bastion)

    up = None
    tunnel_ports: dict[str, int] = {}
    if start_up:
        up = start_ephemwork_up(processes, folder, sshd, backends, env, proxy_port, control_port)
        tunnel_ports = {
            str(session["service"]): int(str(session["port"]))
            for session in control_sessions(control_port, source)
            if session["user"] == EPHEMWORK_USER
        }
    return Ephemwork(proxy_port, control_port, bastion, up, tunnel_ports)


def start_ephemwork_up(
    processes: Processes,
    folder: Path,
    sshd: SshdServer,
    backends: Backends,
    env: dict[str, str],
    proxy_port: int,
    control_port: int,
) -> Child:
    """Write ephemwork.toml for the running backends and start ``up`` for both."""
    (folder / "ephemwork.toml").write_text(
        "[tunnel]\n"
        'type = "ssh"\n'
        'host = "127.0.0.1"\n'
        f"port = {sshd.port}\n"
        f'user = "{sshd.username}"\n'
        f'identity_file = "{sshd.client_key_path}"\n'
        f'known_hosts = "{sshd.known_hosts_path}"\n'
        f"control_port = {control_port}\n"
        f"proxy_port = {proxy_port}\n"
        "\n[service.fast]\n"
        f"port = {backends.fast_port}\n"
        "\n[service.uvicorn]\n"
        f"port = {backends.uvicorn_port}\n"
        'health_check_path = "/json"\n',
        encoding="utf-8",
    )
    up = processes.start(
        f"up-{folder.name}",
        [sys.executable, str(BENCH_DIR / "launch.py"), "up", *BACKENDS],
        env=env,
        cwd=folder,
    )
    for backend in BACKENDS:
        wait_for_text(up, f"{EPHEMWORK_USER}:{backend} is routed to")
    return up


def protocol_version(source: Path | None = None) -> str:
    """Return the control API version that the ephemwork in *source* speaks.

    It is read from the source rather than imported, because ``--compare`` runs an older
    revision whose version may differ from the checkout's.
    """
    text = ((source or source_dir) / "ephemwork" / "wire" / "protocol.py").read_text()
    found = re.search(r"^PROTOCOL_VERSION = (\d+)$", text, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no PROTOCOL_VERSION in {source or source_dir}")
    return found.group(1)


def control_sessions(control_port: int, source: Path | None = None) -> list[dict[str, object]]:
    """Return the bastion's sessions from ``GET /v1/sessions``."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{control_port}/v1/sessions",
        headers={"X-Ephemwork-Protocol": protocol_version(source)},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        body = json.loads(response.read())
    sessions: list[dict[str, object]] = body["sessions"]
    return sessions


def register_sessions(control_port: int, user: str, count: int) -> None:
    """Register *count* sessions ``USER:s0``… through the control API, without tunnels."""
    for index in range(count):
        payload = {"user": user, "service": f"s{index}", "client": "benchmark"}
        request = urllib.request.Request(
            f"http://127.0.0.1:{control_port}/v1/sessions",
            data=json.dumps(payload).encode(),
            headers={
                "X-Ephemwork-Protocol": protocol_version(),
                "Content-Type": "application/json",
            },
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()


def ephemwork_env(folder: Path, levers: str, source: Path | None = None) -> dict[str, str]:
    """Return the environment for ephemwork commands with their own home and *levers*."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("EPHEMWORK_")}
    env["EPHEMWORK_HOME"] = str(folder / "home")
    env["EPHEMWORK_USER"] = EPHEMWORK_USER
    env["EPHEMWORK_BENCH_LEVERS"] = levers
    env["PYTHONPATH"] = str(source or source_dir)
    return env


def use_source(revision: str, work: Path) -> Path:
    """Export ``src/`` of git *revision* into *work* and run ephemwork from there."""
    global source_dir
    source_dir = export_source(revision, work)
    return source_dir


def use_worktree_copy(work: Path) -> Path:
    """Copy ``src/`` of the working tree into *work* and run ephemwork from there."""
    global source_dir
    source_dir = work / "source-worktree" / "src"
    shutil.copytree(REPO_ROOT / "src", source_dir, ignore=shutil.ignore_patterns("__pycache__"))
    return source_dir


def export_source(revision: str, work: Path) -> Path:
    """Export ``src/`` of git *revision* into *work* and return the exported ``src`` folder."""
    archive = subprocess.run(
        ["git", "archive", revision, "src"], cwd=REPO_ROOT, capture_output=True, check=True
    ).stdout
    export = work / f"source-{revision}"
    export.mkdir()
    subprocess.run(["tar", "-x", "-C", str(export)], input=archive, check=True)
    return export / "src"


def _ssh_argv(sshd: SshdServer) -> list[str]:
    return [
        "ssh",
        "-p",
        str(sshd.port),
        "-i",
        str(sshd.client_key_path),
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"UserKnownHostsFile={sshd.known_hosts_path}",
        "-o",
        "ExitOnForwardFailure=yes",
        "-o",
        "ServerAliveInterval=5",
        "-F",
        "/dev/null",
    ]


def _login(sshd: SshdServer) -> str:
    return f"{sshd.username}@127.0.0.1"


def _nginx_conf(prefix: Path, http_body: str) -> Path:
    """Write a one-worker nginx config under *prefix* that stays in the foreground."""
    prefix.mkdir(parents=True, exist_ok=True)
    user = "user root;" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(
        textwrap.dedent(
            f"""
            {user}
            daemon off;
            worker_processes 1;
            pid {prefix}/nginx.pid;
            error_log {prefix}/error.log warn;
            events {{ worker_connections 4096; }}
            http {{
                access_log off;
                client_body_temp_path {prefix}/client_body;
                proxy_temp_path {prefix}/proxy;
                fastcgi_temp_path {prefix}/fastcgi;
                uwsgi_temp_path {prefix}/uwsgi;
                scgi_temp_path {prefix}/scgi;
            """
        )
        + textwrap.dedent(http_body)
        + "\n}\n",
        encoding="utf-8",
    )
    return conf
