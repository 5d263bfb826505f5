"""Fixtures shared by every test: free ports, a real OpenSSH sshd, and the built zipapp."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers.moto import FAKE_AWS_ENV, MotoServer
from helpers.ports import find_free_port
from helpers.repo import BUILD_PYZ_SCRIPT, PYZ_PATH, REPO_ROOT, skip_or_fail
from helpers.sshd import (
    SshdFactory,
    SshdServer,
    SshdUnavailableError,
    find_ssh_keygen,
    find_sshd,
    start_sshd,
)


@pytest.fixture
def free_port() -> Callable[[], int]:
    """Return a function that picks a TCP port on 127.0.0.1 that was free a moment ago."""
    return find_free_port


@pytest.fixture
def sshd_factory(tmp_path: Path) -> Iterator[SshdFactory]:
    """Start real sshd servers on 127.0.0.1 on demand and stop them all after the test.

    Call it with sshd_config keywords to replace defaults, e.g.
    ``sshd_factory(PermitOpen="127.0.0.1:8000")``. The call is synchronous: it generates
    keys, starts sshd and blocks until sshd sends its SSH banner.
    """
    try:
        find_sshd()
        find_ssh_keygen()
    except SshdUnavailableError as exc:
        skip_or_fail(str(exc))

    servers: list[SshdServer] = []

    def start(**options: str) -> SshdServer:
        server = start_sshd(tmp_path / f"sshd-{len(servers)}", options)
        servers.append(server)
        return server

    yield start

    for server in servers:
        server.stop()


@pytest.fixture
def sshd(sshd_factory: SshdFactory) -> SshdServer:
    """A real sshd on 127.0.0.1 that accepts the generated client key and allows forwarding."""
    return sshd_factory()


@pytest.fixture(scope="session")
def pyz_path() -> Path:
    """Build ``dist/ephemwork.pyz`` with scripts/build_pyz.sh once per test session."""
    result = subprocess.run(
        [str(BUILD_PYZ_SCRIPT), str(PYZ_PATH)],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.fail(
            f"scripts/build_pyz.sh failed with exit status {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return PYZ_PATH


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """One moto server on 127.0.0.1 for the whole session."""
    pytest.importorskip("moto.server")
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def aws_env(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    """Fake credentials, and every AWS endpoint pointed at a freshly reset moto server."""
    moto_server.reset()
    for name, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.url)
    monkeypatch.setenv("EPHEMWORK_AWS_ENDPOINT_URL", moto_server.url)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return moto_server
