"""Local mode: a bastion in this process, reached through a real SSH reverse forward.

``[tunnel] type = "local"`` lets a newcomer try the whole request path without AWS. The
bastion's proxy listens on ``127.0.0.1:<proxy_port>``; its embedded SSH server listens on a
free loopback port and trusts only a key generated for this run, which never touches disk
outside a private temporary folder.
"""

from __future__ import annotations

import getpass
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncssh
import structlog

from ephemwork.bastion.server import BastionOptions, BastionServer
from ephemwork.client.tunnel import TunnelTarget
from ephemwork.config import LocalTunnel

log = structlog.get_logger()

# A local bastion lives only as long as `up`, so a short lease makes a crashed `up` in
# another terminal release its routes quickly.
LOCAL_LEASE_TTL = 30.0


@asynccontextmanager
async def local_bastion(tunnel: LocalTunnel) -> AsyncIterator[TunnelTarget]:
    """Run a bastion on loopback for the duration of the block and yield how to reach it."""
    key = asyncssh.generate_private_key("ssh-ed25519", comment="ephemwork local mode")

    with tempfile.TemporaryDirectory(prefix="ephemwork-local-") as folder:
        authorized_keys = Path(folder) / "authorized_keys"
        authorized_keys.write_text(key.export_public_key().decode(), encoding="utf-8")

        options = BastionOptions(
            state_dir=Path(folder) / "state",
            listen=("127.0.0.1", tunnel.proxy_port),
            control_listen=("127.0.0.1", 0),
            ssh_listen=("127.0.0.1", 0),
            authorized_keys=authorized_keys,
            lease_ttl=LOCAL_LEASE_TTL,
        )
        async with BastionServer(options) as server:
            host_key = server.host_public_key
            assert host_key is not None, "a bastion with ssh_listen always has a host key"

            proxy_host, proxy_port = server.proxy_address
            ssh_port = server.ssh_address[1]
            log.info("local_bastion.started", proxy_port=proxy_port, ssh_port=ssh_port)
            yield TunnelTarget(
                host="127.0.0.1",
                port=ssh_port,
                username=getpass.getuser(),
                client_keys=[key],
                known_hosts=([host_key], [], []),
                control_port=server.control_address[1],
                proxy_port=proxy_port,
                public_url=f"http://{proxy_host}:{proxy_port}/",
                description=f"local bastion on 127.0.0.1 (ssh port {ssh_port})",
            )

        log.info("local_bastion.stopped", proxy_port=proxy_port)
