"""Tests for the command line's handling of arguments, through click's CliRunner."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from ephemwork.cli import main


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """A runner with its own EPHEMWORK_HOME and user."""
    monkeypatch.setenv("EPHEMWORK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EPHEMWORK_USER", "alice")
    return CliRunner()


class TestConfigOption:
    @pytest.mark.parametrize("command", [["status"], ["down"], ["down", "api"], ["up", "api"]])
    def test_missing_file_rejected(
        self, runner: CliRunner, tmp_path: Path, command: list[str]
    ) -> None:
        """Every command that takes --config rejects a path that does not exist."""
        missing = tmp_path / "nope.toml"

        result = runner.invoke(main, [command[0], "--config", str(missing), *command[1:]])

        assert result.exit_code == 2
        assert result.output == f"error: {missing}: file not found. Check the --config path.\n"


class TestServeBastionOptions:
    def test_bad_listen_address(self, runner: CliRunner) -> None:
        """A --listen value without a port is rejected with the expected form."""
        result = runner.invoke(main, ["serve-bastion", "--listen", "0.0.0.0"])

        assert result.exit_code == 2
        assert "'0.0.0.0' is not HOST:PORT, for example 127.0.0.1:7070." in result.output

    def test_bad_port_range(self, runner: CliRunner) -> None:
        """A reversed --port-range is rejected with the rule and an example."""
        result = runner.invoke(main, ["serve-bastion", "--port-range", "30000-20000"])

        assert result.exit_code == 2
        assert "'30000-20000' is not a port range" in result.output
