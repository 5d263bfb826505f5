"""Measurements of live processes: resident memory, TCP_NODELAY on their sockets, py-spy.

`nodelay_of_process` copies each TCP socket of another process into this one with
``pidfd_getfd(2)`` (Linux 5.6+, needs ptrace rights over the target, which root has) and
reads ``TCP_NODELAY`` with ``getsockopt`` on that live socket.
"""

from __future__ import annotations

import collections
import ctypes
import os
import platform
import re
import socket
import subprocess
from pathlib import Path

import attrs

# pidfd_getfd has the same number on every architecture that postdates it, and on x86_64.
_SYS_PIDFD_GETFD = 438

_libc = ctypes.CDLL(None, use_errno=True)


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """Return *field* (VmRSS or VmHWM) of *pid* from /proc, in MiB."""
    status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
    match = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no {field} in /proc/{pid}/status")
    return int(match.group(1)) / 1024


def descendants(root_pid: int) -> list[int]:
    """Return *root_pid* and every process below it, read from /proc."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        children[int(stat.rpartition(")")[2].split()[1])].append(int(entry.name))

    found = [root_pid]
    pending = [root_pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def cpu_seconds(root_pid: int) -> float:
    """Return the user plus system CPU time of *root_pid* and its descendants, in seconds."""
    ticks = 0
    for pid in descendants(root_pid):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        # Fields 14 and 15 (utime, stime) are the 12th and 13th after the command name.
        fields = stat.rpartition(")")[2].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


@attrs.frozen
class SocketOption:
    """TCP_NODELAY of one established TCP socket of a process."""

    pid: int
    local_port: int
    remote_port: int
    nodelay: bool


def nodelay_of_process(pid: int) -> list[SocketOption]:
    """Return TCP_NODELAY of every established IPv4 TCP socket that *pid* holds."""
    connections = _established_tcp_by_inode()
    found = []
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = list(fd_dir.iterdir())
    except OSError:
        return []

    for entry in entries:
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        match = re.fullmatch(r"socket:\[(\d+)\]", target)
        if match is None or int(match.group(1)) not in connections:
            continue
        local_port, remote_port = connections[int(match.group(1))]
        nodelay = _read_nodelay(pid, int(entry.name))
        if nodelay is not None:
            found.append(SocketOption(pid, local_port, remote_port, nodelay))
    return found


def _established_tcp_by_inode() -> dict[int, tuple[int, int]]:
    table = {}
    lines = Path("/proc/net/tcp").read_text(encoding="utf-8").splitlines()[1:]
    for line in lines:
        fields = line.split()
        # State 01 is TCP_ESTABLISHED.
        if fields[3] != "01":
            continue
        local_port = int(fields[1].rpartition(":")[2], 16)
        remote_port = int(fields[2].rpartition(":")[2], 16)
        table[int(fields[9])] = (local_port, remote_port)
    return table


def _read_nodelay(pid: int, fd: int) -> bool | None:
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        copied = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
    finally:
        os.close(pidfd)
    if copied < 0:
        return None

    # The copy shares the socket with the target process; closing it closes only the copy.
    sock = socket.socket(fileno=copied)
    try:
        return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    finally:
        sock.close()


def pidfd_getfd_supported() -> bool:
    """Return whether this kernel has pidfd_getfd (Linux 5.6 and later on x86_64)."""
    if platform.machine() != "x86_64":
        return False
    major, minor = (int(part) for part in platform.release().split(".")[:2])
    return (major, minor) >= (5, 6)


def record_profile(py_spy: str, pid: int, seconds: float, output: Path) -> Path:
    """Sample *pid* with py-spy for *seconds* into a collapsed-stack file (py-spy ``raw``)."""
    subprocess.run(
        [
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, round(seconds))),
            "--rate",
            "250",
            "--format",
            "raw",
            "--output",
            str(output),
            "--nonblocking",
        ],
        capture_output=True,
        check=True,
        timeout=seconds + 60,
    )
    return output


@attrs.frozen
class ProfileSummary:
    """Shares of samples, in percent: by leaf frame (self) and by frame anywhere (total)."""

    samples: int
    self_top: list[tuple[str, float]]
    total_top: list[tuple[str, float]]


def summarize_profile(path: Path, top: int = 12) -> ProfileSummary:
    """Summarize a py-spy raw file; frames are ``function (file)`` without line numbers."""
    self_counts: collections.Counter[str] = collections.Counter()
    total_counts: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(frame) for frame in stack.split(";")[1:] if frame]
        if not frames:
            continue
        samples += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            total_counts[frame] += count

    def shares(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(name, 100 * count / max(samples, 1)) for name, count in counter.most_common(top)]

    return ProfileSummary(samples, shares(self_counts), shares(total_counts))


def _frame_name(frame: str) -> str:
    # "handle (ephemwork/bastion/proxy.py:217)" -> "handle (bastion/proxy.py)"
    match = re.fullmatch(r"(.*) \((.*?)(?::\d+)?\)", frame.strip())
    if match is None:
        return frame.strip()
    function, file = match.groups()
    parts = Path(file).parts
    return f"{function} ({'/'.join(parts[-2:])})"
