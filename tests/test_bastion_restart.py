"""``serve-bastion`` killed with SIGKILL and restarted on the same state folder and ports.

The test plays the laptop: it registers routes through the control API and opens real
reverse forwards through OpenSSH ``sshd`` with asyncssh. sshd owns the forwards, so they
outlive the bastion process as they do in production. After the restart the test makes no control
API call and opens no forward before it checks that the routes work again.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import attrs
import pytest
from aiohttp import web

from ephemwork.bastion.registry import REGISTRY_FILE_NAME
from helpers.bastion_path import BastionProcess, ControlClient, connect_sshd
from helpers.cli import base_environment
from helpers.sshd import SshdServer

# Chunks and pause of the dev server's slow download, so it is still running at the kill.
SLOW_CHUNKS = 200
SLOW_PAUSE = 0.05


@attrs.define
class DevServer:
    """An aiohttp dev server that names its service and streams slowly on request."""

    name: str
    started_streams: asyncio.Event = attrs.Factory(asyncio.Event)
    upload_bytes: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/slow", self.slow)
        app.router.add_post("/upload", self.upload)
        app.router.add_get("/{tail:.*}", self.hello)
        return app

    async def hello(self, request: web.Request) -> web.Response:
        return web.Response(text=f"hello from {self.name}")

    async def slow(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        self.started_streams.set()
        for _ in range(SLOW_CHUNKS):
            await response.write(b"x" * 1024)
            await asyncio.sleep(SLOW_PAUSE)
        await response.write_eof()
        return response

    async def upload(self, request: web.Request) -> web.Response:
        async for chunk in request.content.iter_any():
            self.upload_bytes += len(chunk)
        return web.Response(text=str(self.upload_bytes))


@pytest.fixture
def bastions() -> Iterator[list[BastionProcess]]:
    """Bastion processes started by a test; their process groups are killed afterwards."""
    started: list[BastionProcess] = []
    yield started
    for bastion in started:
        bastion.stop()
        # Shown by pytest only when the test fails.
        print(f"--- output of serve-bastion:\n{bastion.output}")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain HTTP client for the proxy and the control API."""
    async with aiohttp.ClientSession() as session:
        yield session


async def serve(app: web.Application, runners: list[web.AppRunner]) -> int:
    """Serve *app* on 127.0.0.1 and return its port."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    runners.append(runner)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port: int = runner.addresses[0][1]
    return port


@pytest.fixture
async def runners() -> AsyncIterator[list[web.AppRunner]]:
    """Dev server runners started by a test, cleaned up afterwards."""
    started: list[web.AppRunner] = []
    yield started
    for runner in started:
        await runner.cleanup()


async def get_text(http: aiohttp.ClientSession, url: str, route: str) -> tuple[int, str]:
    """Send a GET with ``X-Ephemwork: route`` and return the status and body."""
    async with http.get(url, headers={"X-Ephemwork": route}) as response:
        return response.status, await response.text()


async def slow_download(http: aiohttp.ClientSession, url: str) -> int:
    """Read the slow stream until the connection breaks; return the bytes received."""
    received = 0
    try:
        async with http.get(url, headers={"X-Ephemwork": "alice:api"}) as response:
            async for chunk in response.content.iter_any():
                received += len(chunk)
    except aiohttp.ClientError:
        pass
    return received


async def slow_upload(http: aiohttp.ClientSession, url: str) -> None:
    """Upload a body slowly until the connection breaks."""

    async def body() -> AsyncIterator[bytes]:
        for _ in range(SLOW_CHUNKS):
            yield b"y" * 1024
            await asyncio.sleep(SLOW_PAUSE)

    try:
        async with http.post(url, data=body(), headers={"X-Ephemwork": "bob:web"}) as response:
            await response.read()
    except aiohttp.ClientError:
        pass


async def renew_storm(control: ControlClient, session_id: str, acknowledged: list[float]) -> None:
    """Renew *session_id* back to back, recording each acknowledged expiry, until it fails."""
    try:
        while True:
            acknowledged.append(await control.renew(session_id))
    except aiohttp.ClientError:
        pass


def copy_registry(state_dir: Path, target: Path) -> Path:
    """Copy the registry with its write-ahead log as the killed process left it."""
    target.mkdir()
    for suffix in ("", "-wal", "-shm"):
        source = state_dir / (REGISTRY_FILE_NAME + suffix)
        if source.exists():
            shutil.copy(source, target / source.name)
    return target / REGISTRY_FILE_NAME


async def poll(condition: Callable[[], bool | Awaitable[bool]], deadline: float, what: str) -> None:
    """Check ``condition()`` every 0.1 s until it is true; fail after *deadline* seconds."""
    end = time.monotonic() + deadline
    while True:
        result = condition()
        if result if isinstance(result, bool) else await result:
            return
        assert time.monotonic() < end, f"timed out after {deadline} s waiting for {what}"
        await asyncio.sleep(0.1)


class TestKillAndRestart:
    async def test_routes_survive(
        self,
        tmp_path: Path,
        sshd: SshdServer,
        bastions: list[BastionProcess],
        http: aiohttp.ClientSession,
        runners: list[web.AppRunner],
    ) -> None:
        """After SIGKILL mid-traffic and a restart, routes, ports and leases are as before."""
        state_dir = tmp_path / "state"
        bastion = BastionProcess(state_dir, base_environment(tmp_path / "home"))
        bastions.append(bastion)
        await asyncio.to_thread(bastion.start)
        control = ControlClient(http, bastion.control_base)

        api, web_ = DevServer("api"), DevServer("web")
        ssh = await connect_sshd(sshd)
        try:
            alice = await control.register("alice", "api")
            bob = await control.register("bob", "web")
            await ssh.forward_remote_port(
                "127.0.0.1", alice.port, "127.0.0.1", await serve(api.app(), runners)
            )
            await ssh.forward_remote_port(
                "127.0.0.1", bob.port, "127.0.0.1", await serve(web_.app(), runners)
            )
            before = {
                (session.user, session.service): session for session in await control.sessions()
            }
            assert await get_text(http, bastion.base + "/", "alice:api") == (200, "hello from api")

            # Traffic in flight at the kill: a download, an upload and back-to-back renewals.
            acknowledged: list[float] = []
            download = asyncio.create_task(
                slow_download(http, bastion.base + "/slow"), name="download"
            )
            upload = asyncio.create_task(slow_upload(http, bastion.base + "/upload"), name="upload")
            storm = asyncio.create_task(
                renew_storm(control, alice.session_id, acknowledged), name="storm"
            )
            await asyncio.wait_for(api.started_streams.wait(), 5)
            await poll(lambda: len(acknowledged) >= 5 and web_.upload_bytes > 0, 5, "traffic")

            await asyncio.to_thread(bastion.kill)
            killed_at = time.time()
            received = await asyncio.wait_for(download, 10)
            await asyncio.wait_for(upload, 10)
            await asyncio.wait_for(storm, 10)
            on_disk = copy_registry(state_dir, tmp_path / "copy")

            await asyncio.to_thread(bastion.start)

            after = {
                (session.user, session.service): session for session in await control.sessions()
            }
            statuses = [
                await get_text(http, bastion.base + "/after", "alice:api"),
                await get_text(http, bastion.base + "/after", "bob:web"),
            ]
        finally:
            ssh.close()
            await ssh.wait_closed()

        assert received < SLOW_CHUNKS * 1024
        assert statuses == [(200, "hello from api"), (200, "hello from web")]
        assert sorted(after) == sorted(before)
        assert [after[key].port for key in sorted(after)] == [
            before[key].port for key in sorted(before)
        ]
        # bob made no renewal, so his expiry is exactly the one committed before the kill.
        bob_key = (bob.user, bob.service)
        alice_key = (alice.user, alice.service)
        assert after[bob_key].lease_expires_at == before[bob_key].lease_expires_at
        # alice's last acknowledged renewal is kept; one sent but unanswered may also be.
        assert after[alice_key].lease_expires_at >= acknowledged[-1]
        assert after[alice_key].lease_expires_at <= killed_at + 60.0
        assert _integrity(on_disk) == "ok"
        assert _stored_expiries(on_disk) == {key: after[key].lease_expires_at for key in after}

    async def test_renew_after_restart(
        self,
        tmp_path: Path,
        bastions: list[BastionProcess],
        http: aiohttp.ClientSession,
    ) -> None:
        """The laptop's next renewal of its old session id succeeds after a restart."""
        bastion = BastionProcess(tmp_path / "state", base_environment(tmp_path / "home"))
        bastions.append(bastion)
        await asyncio.to_thread(bastion.start)
        control = ControlClient(http, bastion.control_base)
        session = await control.register("alice", "api")

        await asyncio.to_thread(bastion.kill)
        await asyncio.to_thread(bastion.start)
        expiry = await control.renew(session.session_id)

        assert expiry > session.lease_expires_at


class TestLeasesAcrossRestart:
    async def test_expired_during_downtime(
        self,
        tmp_path: Path,
        sshd: SshdServer,
        bastions: list[BastionProcess],
        http: aiohttp.ClientSession,
        runners: list[web.AppRunner],
    ) -> None:
        """A lease that ended while the bastion was down is reaped, and its busy port skipped."""
        bastion = BastionProcess(
            tmp_path / "state", base_environment(tmp_path / "home"), lease_ttl=1.0
        )
        bastions.append(bastion)
        await asyncio.to_thread(bastion.start)
        control = ControlClient(http, bastion.control_base)

        ssh = await connect_sshd(sshd)
        try:
            carol = await control.register("carol", "api")
            await ssh.forward_remote_port(
                "127.0.0.1", carol.port, "127.0.0.1", await serve(DevServer("api").app(), runners)
            )
            await asyncio.to_thread(bastion.kill)
            await asyncio.sleep(max(0.0, carol.lease_expires_at - time.time()) + 0.2)

            await asyncio.to_thread(bastion.start)

            async def reaped() -> bool:
                return await control.sessions() == []

            await poll(reaped, 10, "carol's session to be reaped")
            status, _ = await get_text(http, bastion.base + "/", "carol:api")
            # sshd still listens on carol's port, so even a request for it gets another.
            dave = await control.register("dave", "api", preferred_port=carol.port)
        finally:
            ssh.close()
            await ssh.wait_closed()

        assert status == 404
        assert dave.port != carol.port


def _integrity(database: Path) -> str:
    with sqlite3.connect(database) as connection:
        result: str = connection.execute("PRAGMA integrity_check").fetchone()[0]
    return result


def _stored_expiries(database: Path) -> dict[tuple[str, str], float]:
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT user, service, lease_expires_at FROM sessions").fetchall()
    return {(user, service): expiry for user, service, expiry in rows}
