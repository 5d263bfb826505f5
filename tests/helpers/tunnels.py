"""Helpers shared by the tests that run `ephemwork up` against a real bastion."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from helpers.sshd import SshdServer


def ssh_tunnel_table(
    *,
    port: int,
    user: str,
    identity_file: Path,
    known_hosts: Path,
    control_port: int,
    proxy_port: int,
) -> str:
    """Return a ``[tunnel] type = "ssh"`` table for an SSH server on 127.0.0.1:*port*."""
    return (
        "[tunnel]\n"
        'type = "ssh"\n'
        'host = "127.0.0.1"\n'
        f"port = {port}\n"
        f'user = "{user}"\n'
        f'identity_file = "{identity_file}"\n'
        f'known_hosts = "{known_hosts}"\n'
        f"control_port = {control_port}\n"
        f"proxy_port = {proxy_port}\n"
    )


def sshd_tunnel_table(sshd: SshdServer, control_port: int, proxy_port: int) -> str:
    """Return the ``[tunnel]`` table that reaches a bastion through the OpenSSH fixture."""
    return ssh_tunnel_table(
        port=sshd.port,
        user=sshd.username,
        identity_file=sshd.client_key_path,
        known_hosts=sshd.known_hosts_path,
        control_port=control_port,
        proxy_port=proxy_port,
    )


def poll(condition: Callable[[], bool], limit: float, what: str) -> float:
    """Wait until *condition* is true and return the seconds it took; fail after *limit*."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < limit, f"{what} not within {limit} s"
        time.sleep(0.05)
    return time.monotonic() - started
