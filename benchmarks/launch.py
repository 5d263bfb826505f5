"""Run the ``ephemwork`` command with performance levers switched on from outside.

The harness starts ``serve-bastion`` and ``up`` through this script so that it can measure a
change before anyone makes it in ``src/``. ``EPHEMWORK_BENCH_LEVERS`` is a comma-separated
list; with it empty the command runs exactly as the installed ``ephemwork`` does.

- ``asyncio``: asyncio's own event loop instead of uvloop, which ``src/`` uses where installed;
- ``quiet``: ``--log-level warning``, which drops the one info line per proxied request;
- ``nopool``: the relay and the aiohttp proxy close each tunnel connection after one request;
- ``aesgcm``: asyncssh offers ``aes128-gcm@openssh.com`` first (its default is chacha20);
- ``window``: asyncssh channel window 8 MiB and maximum packet 256 KiB (defaults 2 MiB, 32 KiB);
- ``nopty``: ``up`` opens no idle pty session, so OpenSSH's sshd leaves Nagle on.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

LEVERS = frozenset({"asyncio", "quiet", "nopool", "aesgcm", "window", "nopty"})

GCM_FIRST = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
)


def parse_levers(text: str) -> frozenset[str]:
    """Return the lever names in *text*; raise `SystemExit` naming an unknown one."""
    names = frozenset(name.strip() for name in text.split(",") if name.strip())
    unknown = names - LEVERS
    if unknown:
        raise SystemExit(
            f"unknown lever {sorted(unknown)[0]!r} in EPHEMWORK_BENCH_LEVERS; "
            f"use some of {sorted(LEVERS)}"
        )
    return names


def apply_levers(levers: frozenset[str], argv: list[str]) -> list[str]:
    """Patch the libraries for *levers* and return the command line to run."""
    if "asyncio" in levers:
        from ephemwork import cli

        cli._loop_factory = lambda: None

    if "nopool" in levers:
        import aiohttp

        original_init = aiohttp.TCPConnector.__init__

        @functools.wraps(original_init)
        def init_without_pool(self: aiohttp.TCPConnector, *args: Any, **kwargs: Any) -> None:
            kwargs["force_close"] = True
            kwargs.pop("keepalive_timeout", None)
            original_init(self, *args, **kwargs)

        aiohttp.TCPConnector.__init__ = init_without_pool  # type: ignore[method-assign]

        from ephemwork.bastion.tunnel_connections import TunnelConnection, TunnelPool

        def put_nothing(self: TunnelPool, connection: TunnelConnection) -> None:
            connection.abandon()

        TunnelPool.put = put_nothing  # type: ignore[method-assign]

    if levers & {"aesgcm", "window"}:
        _patch_asyncssh_connect(levers)

    if "nopty" in levers:
        from ephemwork.client import tunnel

        async def no_pty(*_args: object) -> None:
            return None

        tunnel._open_idle_pty = no_pty  # type: ignore[assignment]

    if "quiet" in levers:
        return ["--log-level", "warning", *argv]
    return argv


def _patch_asyncssh_connect(levers: frozenset[str]) -> None:
    import asyncssh

    original_connect = asyncssh.connect
    extra: dict[str, Any] = {}
    if "aesgcm" in levers:
        extra["encryption_algs"] = GCM_FIRST
    if "window" in levers:
        extra["window"] = 8 * 1024 * 1024
        extra["max_pktsize"] = 256 * 1024

    @functools.wraps(original_connect)
    def connect(*args: Any, **kwargs: Any) -> Any:
        return original_connect(*args, **{**kwargs, **extra})

    asyncssh.connect = connect


def main() -> None:
    """Apply the levers from the environment and run the ephemwork CLI."""
    levers = parse_levers(os.environ.get("EPHEMWORK_BENCH_LEVERS", ""))
    argv = apply_levers(levers, sys.argv[1:])

    from ephemwork.cli import main as ephemwork_main

    ephemwork_main(argv, prog_name="ephemwork")


if __name__ == "__main__":
    main()
