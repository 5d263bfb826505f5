"""Local mode: a bastion in this process, reached through a real SSH reverse forward.

``[tunnel] type = "local"`` lets a newcomer try the whole request path without AWS. The
bastion's proxy listens on ``127.0.0.1:<proxy_port>``; its embedded SSH server listens on a
free loopback port and trusts only a key generated for this run.

``ephemwork status`` in another terminal reaches this bastion the way it reaches a remote
one: over SSH, with the control API and a probe through the proxy. So the key is written to
``<home>/local-bastion-<pid>.key`` (mode 0600, in the 0700 home folder) for as long as
``up`` runs, and its path, the SSH and proxy ports and the host key go into local state.
This was chosen over a status socket served by ``up`` because the probe then takes the same
path as a developer's request, through the real SSH forward, and ``status`` has one code
path for every tunnel type. The key authorizes nothing once ``up`` has stopped, because the
SSH server that trusts it stops too. ``down`` removes the file that a killed ``up`` left.
"""

from __future__ import annotations

import contextlib
import errno
import getpass
import os
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncssh
import structlog

from ephemwork.bastion.server import BastionOptions, BastionServer
from ephemwork.client.portowner import find_port_owner
from ephemwork.client.tunnel import TunnelTarget
from ephemwork.config import LocalTunnel
from ephemwork.errors import ConfigError
from ephemwork.home import ephemwork_home

log = structlog.get_logger()

# A local bastion lives only as long as `up`, so a short lease makes a crashed `up` in
# another terminal release its routes quickly.
LOCAL_LEASE_TTL = 30.0


@asynccontextmanager
async def local_bastion(tunnel: LocalTunnel) -> AsyncIterator[TunnelTarget]:
    """Run a bastion on loopback for the duration of the block and yield how to reach it."""
    key = asyncssh.generate_private_key("ssh-ed25519", comment="ephemwork local mode")
    key_path = local_key_path(os.getpid())

    with tempfile.TemporaryDirectory(prefix="ephemwork-local-") as folder, _key_file(key, key_path):
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
                client_keys=[str(key_path)],
                known_hosts=([host_key], [], []),
                control_port=server.control_address[1],
                proxy_port=proxy_port,
                public_url=f"http://{proxy_host}:{proxy_port}/",
                description=f"local bastion on 127.0.0.1 (ssh port {ssh_port})",
            )

        log.info("local_bastion.stopped", proxy_port=proxy_port)


def local_key_path(pid: int) -> Path:
    """Return where the local-mode bastion of the ``up`` with *pid* keeps its client key."""
    return ephemwork_home() / f"local-bastion-{pid}.key"


@contextlib.contextmanager
def _key_file(key: asyncssh.SSHKey, path: Path) -> Iterator[None]:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # A file of the same name belongs to a killed `up` that had this pid; its bastion is gone.
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as stream:
        stream.write(key.export_private_key())
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def check_proxy_port_free(tunnel: LocalTunnel, config_path: Path) -> None:
    """Raise `ConfigError` naming the holder if the local proxy port cannot be listened on.

    ``up`` calls this before it builds or starts a dev server, so a busy port fails at once.
    """
    port = tunnel.proxy_port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # The same option aiohttp sets, so a port left in TIME_WAIT counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            return
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise ConfigError(
                    f"Cannot listen on 127.0.0.1:{port} for the local bastion's proxy: "
                    f"{exc.strerror}. Set tunnel.proxy_port in {config_path} to another port."
                ) from exc

    owner = find_port_owner(port)
    holder = f"process {owner.pid} ({owner.command!r})" if owner is not None else "another process"
    raise ConfigError(
        f"Port {port} on 127.0.0.1 (tunnel.proxy_port) is already in use by {holder}. Stop "
        f"that process, or set tunnel.proxy_port in {config_path} to a free port."
    )
