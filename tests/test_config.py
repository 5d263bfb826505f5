"""Tests for ephemwork.toml discovery and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from ephemwork.config import LocalTunnel, SshTunnel, find_config, load_config
from ephemwork.errors import ConfigError


def write_config(folder: Path, text: str) -> Path:
    path = folder / "ephemwork.toml"
    path.write_text(text, encoding="utf-8")
    return path


class TestFindConfig:
    def test_walks_up_to_parent(self, tmp_path: Path) -> None:
        """A config in a parent folder is found from a nested folder."""
        path = write_config(tmp_path, "[service.api]\nport = 8000\n")
        nested = tmp_path / "app" / "src"
        nested.mkdir(parents=True)

        assert find_config(nested) == path.resolve()

    def test_missing_names_folder_and_flag(self, tmp_path: Path) -> None:
        """Without any config the error names the start folder and --config."""
        with pytest.raises(ConfigError) as caught:
            find_config(tmp_path)

        assert str(tmp_path.resolve()) in str(caught.value)
        assert "--config" in str(caught.value)


class TestLoadConfig:
    def test_full_example(self, tmp_path: Path) -> None:
        """The documented example parses into typed tunnel and service settings."""
        path = write_config(
            tmp_path,
            """
[tunnel]
type = "ssh"
host = "bastion.internal"
identity_file = "~/.ssh/id_ed25519"

[service.api]
port = 8000
build_command = "uv sync"
run_command = "uvicorn app.main:app --port 8000 --reload"
health_check_path = "/health"
env = { DEBUG = "1" }

[service.front-end]
port = 5173
run_command = "npm run dev"
""",
        )

        config = load_config(path)

        assert config.tunnel == SshTunnel(
            host="bastion.internal", identity_file="~/.ssh/id_ed25519"
        )
        assert config.service("api").health_check_path == "/health"
        assert config.service("api").env == {"DEBUG": "1"}
        assert config.service("front-end").port == 5173
        assert config.root == tmp_path.resolve()

    def test_tunnel_defaults_to_local(self, tmp_path: Path) -> None:
        """A config without [tunnel] uses the local tunnel on proxy port 8080."""
        config = load_config(write_config(tmp_path, "[service.api]\nport = 8000\n"))

        assert config.tunnel == LocalTunnel(proxy_port=8080)

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            (
                '[service.api]\nport = "8000"\n',
                "service.api.port must be an integer, got '8000'.",
            ),
            (
                "[service.api]\nprot = 8000\n",
                "unknown key 'service.api.prot'; valid keys: build_command, cwd, env, env_file, "
                "health_check_path, health_check_timeout, port, restart, run_command, "
                "stop_timeout.",
            ),
            (
                '[service.api]\nrun_command = "make run"\n',
                "service.api.port is missing; add `port = 8000` with your dev server's port.",
            ),
            (
                "[service.api]\nport = 8000\n[service.web]\nport = 8000\n",
                "service.api.port and service.web.port are both 8000; "
                "give each service its own port.",
            ),
            (
                '[tunnel]\ntype = "k8s"\n',
                "tunnel.type = 'k8s' is not a tunnel type; use one of 'local', 'ssh', 'ec2'.",
            ),
            (
                '[tunnel]\ntype = "ssh"\n',
                "tunnel.host is missing; add it to the table.",
            ),
            (
                '[tunnel]\ntype = "local"\nhost = "x"\n',
                "unknown key 'tunnel.host' for tunnel type 'local'; valid keys: proxy_port, type.",
            ),
            (
                "[service.api]\nport = 70000\n",
                "service.api.port = 70000 is not a TCP port; use a number from 1 to 65535.",
            ),
            (
                '[service.api]\nport = 8000\nhealth_check_path = "health"\n',
                "service.api.health_check_path = 'health' must start with '/'.",
            ),
            (
                "[service.Api]\nport = 8000\n",
                "Invalid service name 'Api' (from [service.Api]): use 1 to 63 characters "
                "from a-z, 0-9, '.', '_' and '-', starting with a letter or digit.",
            ),
            (
                "[service.api]\nport = 8000\nstop_timeout = 0\n",
                "service.api.stop_timeout must be a positive number of seconds.",
            ),
            (
                "service = 3\n",
                "service must be a table such as [service], got 3.",
            ),
            (
                '[service.api]\nport = 8000\nrestart = "always"\n',
                'service.api.restart = \'always\' is not valid; use "on-failure" or "never".',
            ),
            (
                "[service.api]\nport = 8000\nenv_file = 3\n",
                'service.api.env_file must be a path or a list of paths, such as ".env" or '
                '[".env", ".env.local"], got 3.',
            ),
        ],
    )
    def test_mistake_is_one_line(self, tmp_path: Path, text: str, message: str) -> None:
        """Each mistake is reported as one line with the file, the key and the fix."""
        path = write_config(tmp_path, text)

        with pytest.raises(ConfigError) as caught:
            load_config(path)

        assert str(caught.value) == f"{path}: {message}"

    def test_invalid_toml(self, tmp_path: Path) -> None:
        """A TOML syntax error names the file and the position."""
        path = write_config(tmp_path, "[service.api\nport = 8000\n")

        with pytest.raises(ConfigError) as caught:
            load_config(path)

        assert str(caught.value).startswith(f"{path}: invalid TOML: ")
        assert "line 1" in str(caught.value)

    def test_unknown_service(self, tmp_path: Path) -> None:
        """Asking for an undefined service lists the defined ones."""
        config = load_config(write_config(tmp_path, "[service.api]\nport = 8000\n"))

        with pytest.raises(ConfigError) as caught:
            config.service("web")

        assert str(caught.value).endswith("no [service.web] table (services defined: api).")

    def test_explicit_path_not_found(self, tmp_path: Path) -> None:
        """A --config path that does not exist is named in the error."""
        missing = tmp_path / "nope.toml"

        with pytest.raises(ConfigError) as caught:
            load_config(missing)

        assert str(caught.value) == f"{missing}: file not found. Check the --config path."

    def test_env_file_string_becomes_list(self, tmp_path: Path) -> None:
        """A single env_file path becomes a list, and restart defaults to on-failure."""
        config = load_config(
            write_config(tmp_path, '[service.api]\nport = 8000\nenv_file = "a.env"\n')
        )

        assert config.service("api").env_file == ["a.env"]
        assert config.service("api").restart == "on-failure"
