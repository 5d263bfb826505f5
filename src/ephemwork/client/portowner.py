"""Which local process listens on a TCP port, read from /proc (Linux only).

Used to say who holds a dev server's port before ``up`` starts the dev server. Without
/proc, or for a process of another user whose file descriptors cannot be read, the owner
is unknown and callers only say that the port is in use.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import attrs

_LISTEN_STATE = "0A"


@attrs.frozen
class PortOwner:
    """A process that holds a listening socket."""

    pid: int
    command: str


def port_accepts_connections(port: int, host: str = "127.0.0.1") -> bool:
    """Return whether something accepts TCP connections on *host*:*port*."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        return probe.connect_ex((host, port)) == 0


def find_port_owner(port: int, proc: Path = Path("/proc")) -> PortOwner | None:
    """Return the process listening on TCP *port* (IPv4 or IPv6), or None if unknown."""
    inodes = _listening_inodes(port, proc)
    if not inodes:
        return None

    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            descriptors = list((entry / "fd").iterdir())
        except OSError:
            continue
        for descriptor in descriptors:
            with contextlib.suppress(OSError):
                target = os.readlink(descriptor)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return PortOwner(int(entry.name), _command_line(entry))
    return None


def _listening_inodes(port: int, proc: Path) -> set[str]:
    inodes: set[str] = set()
    wanted = f"{port:04X}"
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            fields = line.split()
            if len(fields) < 10:
                continue
            local_port = fields[1].rpartition(":")[2]
            if local_port == wanted and fields[3] == _LISTEN_STATE:
                inodes.add(fields[9])
    return inodes


def _command_line(entry: Path) -> str:
    try:
        raw = (entry / "cmdline").read_bytes()
    except OSError:
        return "?"
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part) or "?"
