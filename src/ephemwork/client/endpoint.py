"""Turning a bastion's connection settings into local state and back.

``up`` records a `BastionEndpoint` with each session, so that ``down`` can deregister the
session of a killed ``up`` and ``status`` can ask the bastion about it, each with its own
SSH connection.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncssh

from ephemwork.client.state import BastionEndpoint
from ephemwork.client.tunnel import TunnelTarget

# Seconds `down` and `status` wait for an SSH connection, so an unreachable bastion fails fast.
CONNECT_TIMEOUT = 5.0


def endpoint_of(target: TunnelTarget, *, in_process: bool = False) -> BastionEndpoint | None:
    """Return the settings that reach *target* again, or None if they cannot be recorded.

    A target reached through a proxy command (SSM), or authenticated with a key that lives
    only in memory, cannot be reached from another process.
    """
    if target.proxy_command is not None:
        return None

    identity_files = _key_paths(target.client_keys)
    if identity_files is None:
        return None

    known_hosts: str | None = None
    host_key: str | None = None
    if isinstance(target.known_hosts, str):
        known_hosts = target.known_hosts
    elif isinstance(target.known_hosts, tuple) and len(target.known_hosts) == 3:
        trusted = target.known_hosts[0]
        if not trusted or not isinstance(trusted[0], asyncssh.SSHKey):
            return None
        host_key = trusted[0].export_public_key().decode().strip()
    elif target.known_hosts != ():
        # None (no host key check) is only for tests; `down` must not connect that way.
        return None

    return BastionEndpoint(
        host=target.host,
        port=target.port,
        username=target.username,
        identity_files=identity_files,
        known_hosts=known_hosts,
        host_key=host_key,
        control_port=target.control_port,
        proxy_port=target.proxy_port,
        in_process=in_process,
    )


def target_of(endpoint: BastionEndpoint) -> TunnelTarget:
    """Return the target that connects to the bastion recorded as *endpoint*."""
    known_hosts: object = ()
    if endpoint.host_key is not None:
        known_hosts = ([asyncssh.import_public_key(endpoint.host_key)], [], [])
    elif endpoint.known_hosts is not None:
        known_hosts = endpoint.known_hosts

    address = f"{endpoint.username}@{endpoint.host}:{endpoint.port}"
    return TunnelTarget(
        host=endpoint.host,
        port=endpoint.port,
        username=endpoint.username,
        client_keys=list(endpoint.identity_files) or None,
        known_hosts=known_hosts,
        control_port=endpoint.control_port,
        proxy_port=endpoint.proxy_port,
        public_url=f"http://{endpoint.host}:{endpoint.proxy_port}/",
        description=f"local bastion ({address})" if endpoint.in_process else f"ssh {address}",
        connect_timeout=CONNECT_TIMEOUT,
    )


def _key_paths(keys: Sequence[asyncssh.SSHKey] | Sequence[str] | None) -> list[str] | None:
    if keys is None:
        return []
    paths = [key for key in keys if isinstance(key, str)]
    return paths if len(paths) == len(keys) else None
