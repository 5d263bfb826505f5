"""How to reach the bastion for each ``[tunnel]`` type."""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from ephemwork.client.tunnel import TunnelTarget, missing_file
from ephemwork.config import Ec2Tunnel, LocalTunnel, SshTunnel, TunnelConfig
from ephemwork.errors import ConfigError


def ssh_target(tunnel: SshTunnel) -> TunnelTarget:
    """Describe a bastion reached with plain SSH, its host key checked against known_hosts."""
    identity = [str(Path(tunnel.identity_file).expanduser())] if tunnel.identity_file else None
    # asyncssh reads () as "use ~/.ssh/known_hosts", as the OpenSSH client does.
    known_hosts: object = str(Path(tunnel.known_hosts).expanduser()) if tunnel.known_hosts else ()
    public_url = tunnel.public_url or f"http://{tunnel.host}:{tunnel.proxy_port}/"

    return TunnelTarget(
        host=tunnel.host,
        port=tunnel.port,
        username=tunnel.user,
        client_keys=identity,
        known_hosts=known_hosts,
        control_port=tunnel.control_port,
        proxy_port=tunnel.proxy_port,
        public_url=public_url,
        description=f"ssh {tunnel.user}@{tunnel.host}:{tunnel.port}",
        # OpenSSH's sshd turns on TCP_NODELAY only while a pty session is open.
        want_pty=True,
    )


def check_ssh_files(tunnel: SshTunnel) -> None:
    """Raise ConfigError if the identity or known_hosts file that *tunnel* names is missing.

    ``up`` calls this before it starts any dev server, so that a wrong path is reported
    at once instead of after the build and the health check.
    """
    problem = missing_file(ssh_target(tunnel))
    if problem is not None:
        raise ConfigError(problem)


@asynccontextmanager
async def open_target(tunnel: TunnelConfig) -> AsyncIterator[TunnelTarget]:
    """Yield the target for *tunnel*, running a local bastion for as long as needed."""
    if isinstance(tunnel, LocalTunnel):
        # Imported here so that client commands for remote bastions never load the bastion.
        from ephemwork.local_mode import local_bastion

        async with local_bastion(tunnel) as target:
            yield target
        return

    if isinstance(tunnel, SshTunnel):
        yield ssh_target(tunnel)
        return

    assert isinstance(tunnel, Ec2Tunnel)
    # Imported here so that the other tunnel types never load botocore.
    if importlib.util.find_spec("aioboto3") is None:
        raise ConfigError(
            'tunnel.type = "ec2" needs aioboto3, which is not installed; run '
            "`pip install 'ephemwork[aws]'`."
        )
    from ephemwork.client.ssm import ec2_target

    yield await ec2_target(tunnel)
