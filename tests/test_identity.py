"""Tests for user and service name rules and the user's identity."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ephemwork.errors import InvalidNameError
from ephemwork.identity import is_valid_name, resolve_user, validate_name


class TestNameRule:
    @pytest.mark.parametrize("name", ["api", "front-end", "a", "x.y_z-9", "0abc", "a" * 63])
    def test_accepts_valid(self, name: str) -> None:
        """Names from the allowed characters, starting with a letter or digit, pass."""
        assert is_valid_name(name)

    @pytest.mark.parametrize(
        "name", ["", "Api", "-api", ".api", "a" * 64, "a:b", "a b", "é", "api\n", "a\x00"]
    )
    def test_rejects_invalid(self, name: str) -> None:
        """Upper case, leading punctuation, long names and unsafe characters fail."""
        assert not is_valid_name(name)

    def test_message_names_value_and_rule(self) -> None:
        """The error shows the value, where it came from and the allowed characters."""
        with pytest.raises(InvalidNameError) as caught:
            validate_name("user", "Bob Smith", source="EPHEMWORK_USER")

        assert str(caught.value) == (
            "Invalid user name 'Bob Smith' (from EPHEMWORK_USER): use 1 to 63 characters "
            "from a-z, 0-9, '.', '_' and '-', starting with a letter or digit."
        )


class TestResolveUser:
    def test_environment_override(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """EPHEMWORK_USER wins over git."""
        monkeypatch.setenv("EPHEMWORK_USER", "carol")

        assert resolve_user() == "carol"

    def test_git_email_local_part(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """Without the override, the local part of git's user.email is used, lower-cased."""
        monkeypatch.delenv("EPHEMWORK_USER", raising=False)
        self._isolate_git(monkeypatch, tmp_path)
        subprocess.run(
            ["git", "config", "--global", "user.email", "Dana.K@example.com"], check=True
        )

        assert resolve_user() == "dana.k"

    def test_no_email_says_how_to_fix(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """Without git e-mail or override the error names both fixes."""
        monkeypatch.delenv("EPHEMWORK_USER", raising=False)
        self._isolate_git(monkeypatch, tmp_path)

        with pytest.raises(InvalidNameError) as caught:
            resolve_user()

        assert "git config user.email" in str(caught.value)
        assert "EPHEMWORK_USER" in str(caught.value)

    def test_invalid_override_rejected(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An override with a colon cannot go into the header and is rejected."""
        monkeypatch.setenv("EPHEMWORK_USER", "eve:admin")

        with pytest.raises(InvalidNameError):
            resolve_user()

    @staticmethod
    def _isolate_git(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
        monkeypatch.delenv("GIT_CONFIG_GLOBAL", raising=False)
        monkeypatch.chdir(home)
