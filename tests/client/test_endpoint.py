"""Recording a bastion's connection settings in local state and reading them back."""

from __future__ import annotations

import asyncssh

from ephemwork.client.endpoint import endpoint_of, target_of
from ephemwork.client.tunnel import TunnelTarget


def _target(**changes: object) -> TunnelTarget:
    fields: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 2222,
        "username": "alice",
        "client_keys": ["/keys/id"],
        "known_hosts": "/keys/known_hosts",
        "control_port": 7070,
        "proxy_port": 8080,
        "public_url": "http://127.0.0.1:8080/",
        "description": "test",
    }
    fields.update(changes)
    return TunnelTarget(**fields)  # type: ignore[arg-type]


class TestEndpoint:
    def test_ssh_round_trip(self) -> None:
        """Key files and a known_hosts path survive the round trip."""
        endpoint = endpoint_of(_target())
        assert endpoint is not None

        target = target_of(endpoint)

        assert target.client_keys == ["/keys/id"]
        assert target.known_hosts == "/keys/known_hosts"
        assert (target.control_port, target.proxy_port) == (7070, 8080)

    def test_trusted_host_key(self) -> None:
        """A trusted host key (local mode) is stored as an OpenSSH line and imported back."""
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        endpoint = endpoint_of(_target(known_hosts=([host_key], [], [])), in_process=True)
        assert endpoint is not None

        trusted = target_of(endpoint).known_hosts

        assert isinstance(trusted, tuple)
        assert trusted[0][0].export_public_key() == host_key.export_public_key()

    def test_in_memory_key(self) -> None:
        """A key that exists only in memory cannot be recorded."""
        key = asyncssh.generate_private_key("ssh-ed25519")

        assert endpoint_of(_target(client_keys=[key])) is None

    def test_proxy_command(self) -> None:
        """A target behind a proxy command (SSM) cannot be recorded."""
        assert endpoint_of(_target(proxy_command="ssm")) is None
