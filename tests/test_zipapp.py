"""Checks that scripts/build_pyz.sh makes a zipapp that runs on a bare CPython 3.11."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers.repo import BUILD_PYZ_SCRIPT, REPO_ROOT

# A build creates its venv and downloads the pinned wheels on first use, which takes longer
# than the default per-test timeout allows on a fresh machine.
pytestmark = pytest.mark.timeout(600)

EXPECTED_COMMANDS = ("up", "down", "status", "serve-bastion")

# Imported with the archive's own packages; key generation runs cryptography's native code.
RUNTIME_IMPORT_CHECK = """
import aiohttp, asyncssh, attrs, cattrs, click, httptools, orjson, structlog, uvloop
asyncssh.generate_private_key("ssh-ed25519")
orjson.dumps({"a": 1})
uvloop.new_event_loop().close()
print("imports ok")
"""

# AWS support is imported lazily by the CLI and is not shipped in the zipapp.
EXCLUDED_PACKAGES = ("aioboto3", "aiobotocore", "botocore", "boto3")


def _system_python() -> str:
    """Return /usr/bin/python3 if it is 3.11 or newer, else the interpreter behind this venv."""
    system_python = "/usr/bin/python3"
    if Path(system_python).exists() and _python_version(system_python) >= (3, 11):
        return system_python

    return str(sys._base_executable)  # type: ignore[attr-defined]


def _python_version(python: str) -> tuple[int, int]:
    """Return the (major, minor) version of the interpreter at *python*."""
    output = subprocess.run(
        [python, "-c", "import sys; print(*sys.version_info[:2])"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    major, minor = output.split()
    return int(major), int(minor)


def _other_python() -> str | None:
    """Return a CPython 3.10 or newer that is not 3.11, from PATH or pyenv, or None."""
    found = [shutil.which(f"python3.{minor}") for minor in (10, 12, 13)]
    found += [str(path) for path in (Path.home() / ".pyenv" / "versions").glob("3.*/bin/python3")]
    for python in found:
        if python is None:
            continue
        try:
            version = _python_version(python)
        except (OSError, subprocess.CalledProcessError):
            continue  # a pyenv shim for a version that is not selected
        if version >= (3, 10) and version != (3, 11):
            return python
    return None


def _bare_environment(shiv_root: Path, python: str) -> dict[str, str]:
    """Return this process's environment without the test venv and without PYTHONPATH.

    *python*'s folder goes first on PATH, so the pyz shebang ``/usr/bin/env python3`` finds
    that interpreter. shiv extracts into *shiv_root* instead of ~/.shiv.
    """
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}
    }

    venv_prefix = Path(sys.prefix).resolve()
    in_venv = sys.prefix != sys.base_prefix
    kept = [
        entry
        for entry in environment.get("PATH", "").split(os.pathsep)
        if entry and not (in_venv and Path(entry).resolve().is_relative_to(venv_prefix))
    ]
    environment["PATH"] = os.pathsep.join([str(Path(python).parent), *kept])
    environment["SHIV_ROOT"] = str(shiv_root)
    return environment


def _listed_commands(help_text: str) -> set[str]:
    """Return the command names in the "Commands:" section of click's help output."""
    _, _, section = help_text.partition("Commands:\n")
    return {line.split()[0] for line in section.splitlines() if line.startswith("  ")}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def help_run(
    pyz_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> subprocess.CompletedProcess[str]:
    """The result of ``python3 dist/ephemwork.pyz --help`` outside any venv."""
    python = _system_python()
    return subprocess.run(
        [python, str(pyz_path), "--help"],
        cwd=tmp_path_factory.mktemp("cwd"),
        env=_bare_environment(tmp_path_factory.mktemp("shiv"), python),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )


class TestZipapp:
    def test_help_exits_zero(self, help_run: subprocess.CompletedProcess[str]) -> None:
        """``--help`` succeeds with only the system Python and the archive's own packages."""
        assert help_run.returncode == 0, help_run.stderr

    @pytest.mark.parametrize("command", EXPECTED_COMMANDS)
    def test_help_lists_command(
        self, help_run: subprocess.CompletedProcess[str], command: str
    ) -> None:
        """``--help`` lists each client and bastion command."""
        assert command in _listed_commands(help_run.stdout), help_run.stdout

    def test_runs_by_shebang(self, pyz_path: Path, tmp_path: Path) -> None:
        """The archive is executable and its ``/usr/bin/env python3`` shebang starts it."""
        result = subprocess.run(
            [str(pyz_path), "--help"],
            cwd=tmp_path,
            env=_bare_environment(tmp_path / "shiv", _system_python()),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )

        assert result.returncode == 0, result.stderr

    def test_other_python_refused(self, pyz_path: Path, tmp_path: Path) -> None:
        """On a CPython other than 3.11 the archive exits 2 with one line, not a traceback."""
        python = _other_python()
        if python is None:
            pytest.skip("no CPython other than 3.11 is installed here")

        result = subprocess.run(
            [python, str(pyz_path), "status"],
            cwd=tmp_path,
            env=_bare_environment(tmp_path / "shiv", python),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )

        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: ephemwork.pyz was built for CPython 3.11")
        assert "Traceback" not in result.stderr

    def test_imports_runtime_packages(self, pyz_path: Path, tmp_path: Path) -> None:
        """The pinned packages, compiled parts included, import from the archive alone."""
        python = _system_python()
        if _python_version(python) != (3, 11):
            pytest.skip(f"{python} is not CPython 3.11, the only version the pyz has wheels for")

        environment = _bare_environment(tmp_path / "shiv", python)
        # shiv's bootstrap runs the arguments as a Python command line when this is set.
        environment["SHIV_INTERPRETER"] = "1"
        result = subprocess.run(
            [python, str(pyz_path), "-c", RUNTIME_IMPORT_CHECK],
            cwd=tmp_path,
            env=environment,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )

        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "imports ok"

    @pytest.mark.parametrize("package", EXCLUDED_PACKAGES)
    def test_excludes_aws_package(self, pyz_path: Path, package: str) -> None:
        """The AWS SDK stays out of the archive, so the bastion never loads it."""
        with zipfile.ZipFile(pyz_path) as archive:
            top_level = {name.split("/")[1] for name in archive.namelist() if "/" in name}

        assert package not in top_level

    def test_omits_checkout_path(self, pyz_path: Path) -> None:
        """No file in the archive records where the checkout lives, so any clone builds it."""
        checkout = str(REPO_ROOT).encode()
        with zipfile.ZipFile(pyz_path) as archive:
            leaks = [name for name in archive.namelist() if checkout in archive.read(name)]

        assert leaks == []

    def test_build_is_reproducible(self, pyz_path: Path, tmp_path: Path) -> None:
        """A second build of the same checkout is byte-identical to the first."""
        again = tmp_path / "again.pyz"
        result = subprocess.run(
            [str(BUILD_PYZ_SCRIPT), str(again)],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr

        assert _sha256(again) == _sha256(pyz_path)
