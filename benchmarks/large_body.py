"""Stream a large body up and down through the real path and report the bastion's memory.

Everything runs on 127.0.0.1. This process sends the requests to ``ephemwork
serve-bastion`` (a subprocess). The bastion streams them to a tunnel port on which OpenSSH
``sshd`` listens for an ``ssh -N -R`` reverse forward. The forward ends at an aiohttp dev
server, a second subprocess that runs this file with ``--dev-server``. The OpenSSH client
opens the forward in place of the laptop's asyncssh connection, so that encryption on the
laptop side does not compete with the bastion for the CPU.

While both transfers run, a thread samples the bastion's VmRSS in /proc every 20 ms; the
report gives that peak, VmHWM (the kernel's peak since the process started) and, for
each direction, the time to the first byte at the receiving end and the total time.

    .venv/bin/python benchmarks/large_body.py              # 1 GiB each way
    .venv/bin/python benchmarks/large_body.py --size-mib 64 --timeout 60

Exit status 1 when a transfer fails, times out or the peak RSS exceeds --max-rss-mib.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))

from ephemwork.wire import PROTOCOL_HEADER, PROTOCOL_VERSION  # noqa: E402
from helpers.ports import find_free_port  # noqa: E402
from helpers.sshd import SshdServer, start_sshd  # noqa: E402

MIB = 1024 * 1024
# Size of each chunk the sender writes.
CHUNK = 256 * 1024
ROUTE = "bench:large"
PROTOCOL = {PROTOCOL_HEADER: str(PROTOCOL_VERSION)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="body size each way, MiB")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds allowed for each transfer"
    )
    parser.add_argument(
        "--max-rss-mib", type=float, default=100.0, help="fail above this peak VmRSS, MiB"
    )
    parser.add_argument("--dev-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    options = parser.parse_args()

    if options.dev_server is not None:
        web.run_app(dev_server_app(), host="127.0.0.1", port=options.dev_server, print=None)
        return

    with tempfile.TemporaryDirectory(prefix="ephemwork-large-body-") as work:
        sys.exit(run(Path(work), options.size_mib * MIB, options.timeout, options.max_rss_mib))


def dev_server_app() -> web.Application:
    """Build the dev server: POST /upload counts the body, GET /download?bytes=N streams N bytes."""

    async def upload(request: web.Request) -> web.Response:
        received = 0
        first_byte_at = None
        async for chunk in request.content.iter_any():
            if first_byte_at is None:
                first_byte_at = time.time()
            received += len(chunk)
        return web.json_response(
            {"bytes": received, "first_byte_at": first_byte_at, "last_byte_at": time.time()}
        )

    async def download(request: web.Request) -> web.StreamResponse:
        size = int(request.query["bytes"])
        response = web.StreamResponse(headers={"Content-Length": str(size)})
        await response.prepare(request)
        block = b"d" * CHUNK
        sent = 0
        while sent < size:
            part = block[: min(CHUNK, size - sent)]
            await response.write(part)
            sent += len(part)
        await response.write_eof()
        return response

    app = web.Application(client_max_size=0)
    app.router.add_post("/upload", upload)
    app.router.add_get("/download", download)
    return app


class RssSampler:
    """Samples VmRSS of one process every 20 ms in a thread and keeps the maximum."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, status_kib(self.pid, "VmRSS"))
            self._stop.wait(0.02)


def status_kib(pid: int, field: str) -> int:
    """Return a ``kB`` field of /proc/PID/status, such as VmRSS or VmHWM."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(f"{field} not in /proc/{pid}/status")


def run(work: Path, size: int, timeout: float, max_rss_mib: float) -> int:
    children: list[subprocess.Popen[bytes]] = []
    sshd = start_sshd(work / "sshd")
    try:
        proxy_port, control_port, dev_port = find_free_port(), find_free_port(), find_free_port()
        low = 30000 + find_free_port() % 20000
        bastion = spawn(
            children,
            work / "bastion.log",
            [
                sys.executable,
                "-m",
                "ephemwork",
                "--log-format",
                "json",
                "serve-bastion",
                "--listen",
                f"127.0.0.1:{proxy_port}",
                "--control-listen",
                f"127.0.0.1:{control_port}",
                "--port-range",
                f"{low}-{low + 9}",
                "--state-dir",
                str(work / "state"),
            ],
        )
        spawn(
            children,
            work / "dev.log",
            [sys.executable, __file__, "--dev-server", str(dev_port)],
        )
        wait_for_port(proxy_port, bastion, work / "bastion.log")
        wait_for_port(dev_port, children[-1], work / "dev.log")

        tunnel_port = asyncio.run(register(control_port))
        forward = spawn(children, work / "ssh.log", ssh_forward_argv(sshd, tunnel_port, dev_port))
        wait_for_port(tunnel_port, forward, work / "ssh.log")

        with RssSampler(bastion.pid) as sampler:
            figures = asyncio.run(transfer(proxy_port, size, timeout))
        figures["bastion_peak_vmrss_mib"] = sampler.peak_kib / 1024
        figures["bastion_vmhwm_mib"] = status_kib(bastion.pid, "VmHWM") / 1024
    finally:
        for child in reversed(children):
            stop(child)
        sshd.stop()

    print(json.dumps(figures, indent=2))
    if figures["bastion_peak_vmrss_mib"] > max_rss_mib:
        print(f"FAIL: peak VmRSS above {max_rss_mib} MiB", file=sys.stderr)
        return 1
    return 0


def spawn(
    children: list[subprocess.Popen[bytes]], log: Path, argv: list[str]
) -> subprocess.Popen[bytes]:
    """Start *argv* in its own process group with its output in *log*."""
    with log.open("wb") as output:
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    children.append(child)
    return child


def stop(child: subprocess.Popen[bytes]) -> None:
    """Terminate *child*'s process group, then kill it after 5 s."""
    if child.poll() is not None:
        return
    os.killpg(child.pid, signal.SIGTERM)
    try:
        child.wait(5)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def wait_for_port(port: int, child: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until 127.0.0.1:*port* accepts connections; fail if *child* exits or after 30 s."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise SystemExit(f"{log.stem} exited with {child.returncode}:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after 30 s:\n{log.read_text()}")


def ssh_forward_argv(sshd: SshdServer, tunnel_port: int, dev_port: int) -> list[str]:
    ssh = shutil.which("ssh")
    if ssh is None:
        raise SystemExit("ssh not found; install the Debian package openssh-client")
    return [
        ssh,
        "-N",
        "-F",
        "/dev/null",
        "-o",
        "ExitOnForwardFailure=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        f"UserKnownHostsFile={sshd.known_hosts_path}",
        "-i",
        str(sshd.client_key_path),
        "-p",
        str(sshd.port),
        "-R",
        f"127.0.0.1:{tunnel_port}:127.0.0.1:{dev_port}",
        f"{sshd.username}@{sshd.host}",
    ]


async def register(control_port: int) -> int:
    """Register the benchmark's route and return its tunnel port."""
    user, service = ROUTE.split(":")
    body = {"user": user, "service": service, "client": "benchmarks/large_body.py"}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"http://127.0.0.1:{control_port}/v1/sessions", json=body, headers=PROTOCOL
        ) as response:
            document = await response.json()
            if response.status != 201:
                raise SystemExit(f"register failed with {response.status}: {document}")
    port: int = document["session"]["port"]
    return port


async def transfer(proxy_port: int, size: int, limit_seconds: float) -> dict[str, float]:
    """Upload then download *size* bytes through the proxy and return the timings."""
    base = f"http://127.0.0.1:{proxy_port}"
    headers = {"X-Ephemwork": ROUTE}
    figures: dict[str, float] = {"size_mib": size / MIB}

    async def body() -> AsyncIterator[bytes]:
        block = b"u" * CHUNK
        sent = 0
        while sent < size:
            part = block[: min(CHUNK, size - sent)]
            yield part
            sent += len(part)
        figures["upload_last_byte_sent_at"] = time.time()

    timeouts = aiohttp.ClientTimeout(total=limit_seconds)
    async with aiohttp.ClientSession(timeout=timeouts, auto_decompress=False) as http:
        started = time.time()
        upload_headers = {**headers, "Content-Length": str(size)}
        async with http.post(base + "/upload", data=body(), headers=upload_headers) as response:
            result = await response.json()
        if response.status != 200 or result["bytes"] != size:
            raise SystemExit(f"upload failed: {response.status} {result}")
        figures["upload_seconds"] = time.time() - started
        figures["upload_first_byte_seconds"] = result["first_byte_at"] - started
        figures["upload_first_byte_before_last_sent"] = float(
            result["first_byte_at"] < figures.pop("upload_last_byte_sent_at")
        )

        started = time.time()
        received = 0
        async with http.get(base + f"/download?bytes={size}", headers=headers) as response:
            async for chunk in response.content.iter_any():
                if received == 0:
                    figures["download_first_byte_seconds"] = time.time() - started
                received += len(chunk)
        if response.status != 200 or received != size:
            raise SystemExit(f"download failed: {response.status}, {received} of {size} bytes")
        figures["download_seconds"] = time.time() - started

    for direction in ("upload", "download"):
        figures[f"{direction}_mib_per_second"] = size / MIB / figures[f"{direction}_seconds"]
    return figures


if __name__ == "__main__":
    main()
