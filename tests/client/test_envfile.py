"""Tests of env file parsing and the merged dev server environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from ephemwork.client.envfile import build_environment, parse_env_file
from ephemwork.errors import ConfigError


class TestParseEnvFile:
    def test_comments_export_quotes(self, tmp_path: Path) -> None:
        """Comments and blank lines are skipped, export and quotes are removed."""
        path = tmp_path / ".env"
        path.write_text("# db\n\nexport A=1\nB = 'two words'\nC=\"x=y\"\n", encoding="utf-8")

        assert parse_env_file(path, setting="service.api.env_file") == {
            "A": "1",
            "B": "two words",
            "C": "x=y",
        }

    def test_malformed_line_names_file_and_line(self, tmp_path: Path) -> None:
        """A line without '=' is an error naming the file and line number."""
        path = tmp_path / ".env"
        path.write_text("A=1\nnot a pair\n", encoding="utf-8")

        with pytest.raises(ConfigError) as caught:
            parse_env_file(path, setting="service.api.env_file")

        assert str(caught.value) == (
            f"{path}, line 2: expected KEY=VALUE, got 'not a pair'. Fix or remove the line."
        )

    def test_missing_file(self, tmp_path: Path) -> None:
        """A missing env file is named with the setting to fix."""
        path = tmp_path / "nope.env"

        with pytest.raises(ConfigError) as caught:
            parse_env_file(path, setting="service.api.env_file")

        assert str(caught.value) == (
            f"The env file {str(path)!r} does not exist. Create it, or fix "
            "service.api.env_file in ephemwork.toml (relative paths start at the folder of "
            "ephemwork.toml)."
        )


class TestBuildEnvironment:
    def test_order_of_precedence(self, tmp_path: Path) -> None:
        """Later env files override earlier ones and the inherited environment; env wins."""
        (tmp_path / "a.env").write_text("X=a\nY=a\n", encoding="utf-8")
        (tmp_path / "b.env").write_text("Y=b\n", encoding="utf-8")

        environment = build_environment(
            tmp_path,
            ["a.env", "b.env"],
            {"Z": "literal"},
            service="api",
            inherited={"X": "inherited", "Z": "inherited", "HOME": "/h"},
        )

        assert environment == {"X": "a", "Y": "b", "Z": "literal", "HOME": "/h"}
