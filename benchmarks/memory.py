"""Resident memory of ``serve-bastion`` under sessions and idle connections, and the
wall time of the zipapp's ``--help`` and ``status``.
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import subprocess
import time
from pathlib import Path

import probes
from processes import Processes
from stack import (
    REPO_ROOT,
    Backends,
    SshdServer,
    ephemwork_env,
    register_sessions,
    start_ephemwork,
    start_ephemwork_up,
)

SESSIONS = 100
CONNECTIONS = 1000
# Connections opened at once while building up CONNECTIONS.
OPEN_CONCURRENCY = 50
ZIPAPP_RUNS = 5


def measure(
    processes: Processes,
    work: Path,
    sshd: SshdServer,
    backends: Backends,
    levers: str,
    variant: str,
) -> dict[str, float]:
    """Return the bastion's RSS in MiB: idle, with sessions, and with open connections."""
    stack = start_ephemwork(
        processes, work, sshd, backends, levers, name=f"memory-{variant}", start_up=False
    )
    figures: dict[str, float] = {}
    try:
        time.sleep(1.0)
        figures["idle"] = probes.rss_mib(stack.bastion.pid)

        register_sessions(stack.control_port, "rss", SESSIONS)
        time.sleep(0.5)
        figures[f"{SESSIONS} sessions"] = probes.rss_mib(stack.bastion.pid)

        folder = work / f"ephemwork-memory-{variant}"
        stack_up = start_ephemwork_up(
            processes,
            folder,
            sshd,
            backends,
            ephemwork_env(folder, levers),
            stack.proxy_port,
            stack.control_port,
        )
        try:
            asyncio.run(_hold_connections(stack.proxy_port, stack.bastion.pid, figures))
        finally:
            processes.stop(stack_up)
        figures["peak (VmHWM)"] = probes.rss_mib(stack.bastion.pid, "VmHWM")
    finally:
        processes.stop(stack.bastion)
    return figures


async def _hold_connections(proxy_port: int, pid: int, figures: dict[str, float]) -> None:
    """Open CONNECTIONS keep-alive connections, each after one routed request, and measure."""
    request = b"GET / HTTP/1.1\r\nHost: bench\r\nX-Ephemwork: bench:fast\r\n\r\n"
    limit = asyncio.Semaphore(OPEN_CONCURRENCY)
    writers: list[asyncio.StreamWriter] = []

    async def open_one() -> None:
        async with limit:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
            writers.append(writer)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length:\s*(\d+)", head)
            if length is not None:
                await reader.readexactly(int(length.group(1)))

    try:
        async with asyncio.TaskGroup() as group:
            for index in range(CONNECTIONS):
                group.create_task(open_one(), name=f"bench-connection-{index}")
        await asyncio.sleep(1.0)
        figures[f"{SESSIONS} sessions + {CONNECTIONS} connections"] = probes.rss_mib(pid)
    finally:
        for writer in writers:
            writer.close()


def measure_zipapp(work: Path) -> dict[str, float]:
    """Build dist/ephemwork.pyz if src/ is newer, then time ``--help`` and ``status``."""
    pyz = REPO_ROOT / "dist" / "ephemwork.pyz"
    newest_source = max(path.stat().st_mtime for path in (REPO_ROOT / "src").rglob("*.py"))
    if not pyz.exists() or pyz.stat().st_mtime < newest_source:
        subprocess.run([str(REPO_ROOT / "scripts" / "build_pyz.sh")], check=True, cwd=REPO_ROOT)

    python = _python311()
    home = work / "zipapp-home"
    home.mkdir(exist_ok=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith("EPHEMWORK_")}
    env |= {"EPHEMWORK_HOME": str(home), "EPHEMWORK_USER": "bench"}
    figures = {}
    for name, args in (("--help", ["--help"]), ("status", ["status"])):
        argv = [python, str(pyz), *args]
        # The first run unpacks the zipapp's compiled modules into ~/.shiv; time later runs.
        subprocess.run(argv, capture_output=True, env=env, cwd=home, check=True)
        walls = []
        for _ in range(ZIPAPP_RUNS):
            started = time.perf_counter()
            subprocess.run(argv, capture_output=True, env=env, cwd=home, check=True)
            walls.append(time.perf_counter() - started)
        figures[name] = statistics.median(walls)

        imports = subprocess.run(
            [python, "-X", "importtime", *argv[1:]],
            capture_output=True,
            text=True,
            env=env,
            cwd=home,
            check=True,
        )
        for module, microseconds in _top_imports(imports.stderr):
            figures[f"{name} import {module}"] = microseconds / 1e6
    return figures


def _top_imports(stderr: str, count: int = 5) -> list[tuple[str, int]]:
    """Return the top-level imports with the largest cumulative time, in microseconds."""
    found = []
    for line in stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S+)$", line)
        if match is not None:
            found.append((match.group(2), int(match.group(1))))
    found.sort(key=lambda item: -item[1])
    return found[:count]


def _python311() -> str:
    for candidate in ("python3.11", "python3"):
        completed = subprocess.run(["which", candidate], capture_output=True, text=True)
        if completed.returncode == 0:
            return completed.stdout.strip()
    raise RuntimeError("python3.11 not found; the zipapp needs CPython 3.11")
