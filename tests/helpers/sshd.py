"""A real OpenSSH ``sshd`` on 127.0.0.1 for tunnel tests, with keys made per test.

`start_sshd` writes a host key, a client key, ``authorized_keys``, ``known_hosts`` and an
``sshd_config`` into a folder of the caller's, runs ``sshd -D -e -f CONFIG`` as the current
user, and returns once the server has sent its SSH banner. `SshdServer.stop` ends sshd and the
per-connection processes it forked, so no tunnel outlives the test.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import attrs

from helpers.ports import find_free_port

# sshd must be started by absolute path (it re-executes itself), and /usr/sbin is often
# missing from a non-root PATH.
_SEARCH_PATH = os.pathsep.join(["/usr/sbin", "/usr/local/sbin", os.environ.get("PATH", "")])

# Privilege separation directory that sshd requires when it runs as root. Debian's ssh.service
# creates it (RuntimeDirectory=sshd), so it is missing where sshd never ran as a service.
_PRIVSEP_DIR = Path("/run/sshd")

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0
_BIND_ATTEMPTS = 3


class SshdUnavailableError(RuntimeError):
    """The OpenSSH server or ssh-keygen is not installed, so no sshd can be started."""


class SshdStartError(RuntimeError):
    """sshd exited, or sent no SSH banner before the start timeout; the message has its log."""


def find_sshd() -> str:
    """Return the absolute path of ``sshd``, or raise `SshdUnavailableError`."""
    sshd = shutil.which("sshd", path=_SEARCH_PATH)
    if sshd is None:
        raise SshdUnavailableError(
            "sshd not found in /usr/sbin or on PATH; install the Debian package openssh-server."
        )
    return sshd


def find_ssh_keygen() -> str:
    """Return the absolute path of ``ssh-keygen``, or raise `SshdUnavailableError`."""
    keygen = shutil.which("ssh-keygen", path=_SEARCH_PATH)
    if keygen is None:
        raise SshdUnavailableError(
            "ssh-keygen not found on PATH; install the Debian package openssh-client."
        )
    return keygen


@attrs.define
class SshdServer:
    """A running sshd and the files a client needs to reach it."""

    host: str
    port: int
    username: str
    # Private key accepted by the server (OpenSSH format, no passphrase).
    client_key_path: Path
    # known_hosts with one line for "[host]:port" and the server's host key.
    known_hosts_path: Path
    # The host key's public half as one OpenSSH line, "ssh-ed25519 AAAA...", without comment.
    host_public_key: str
    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes]

    def log_text(self) -> str:
        """Return what sshd has logged so far (it logs to stderr, which goes to `log_path`)."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        """Terminate sshd and every process it forked for a connection; safe to call twice."""
        if self.process.returncode is not None:
            return

        # Connection processes call setsid() and so leave sshd's process group, and the
        # listener does not end them on SIGTERM. Find them through their parent ids before
        # the listener exits and they are re-parented.
        connection_pids = _descendants(self.process.pid)
        for pid in connection_pids:
            _signal(pid, signal.SIGTERM)
        self.process.terminate()

        try:
            self.process.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

        deadline = time.monotonic() + _STOP_TIMEOUT
        survivors = [pid for pid in connection_pids if _is_running(pid)]
        while survivors and time.monotonic() < deadline:
            time.sleep(0.05)
            survivors = [pid for pid in survivors if _is_running(pid)]
        for pid in survivors:
            _signal(pid, signal.SIGKILL)


# The ``sshd_factory`` fixture: call it with sshd_config keywords, get a started server.
SshdFactory = Callable[..., SshdServer]


def start_sshd(directory: Path, options: Mapping[str, str] | None = None) -> SshdServer:
    """Write keys and a config into *directory*, start sshd on 127.0.0.1 and wait for it.

    *options* are ``sshd_config`` keywords spelled as in sshd_config(5), such as
    ``{"PermitOpen": "127.0.0.1:9"}``; each replaces the default of the same name.
    """
    sshd = find_sshd()
    keygen = find_ssh_keygen()
    directory.mkdir(parents=True, exist_ok=True)

    host_key = _generate_key(keygen, directory / "ssh_host_ed25519_key", "ephemwork-test-host")
    client_key = _generate_key(keygen, directory / "client_ed25519_key", "ephemwork-test-client")
    authorized_keys = directory / "authorized_keys"
    authorized_keys.write_text(_public_key_line(client_key) + "\n", encoding="utf-8")

    if os.geteuid() == 0:
        _PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)

    # The port is picked before sshd binds it, so another process may take it in between.
    last_error: SshdStartError | None = None
    for _attempt in range(_BIND_ATTEMPTS):
        port = find_free_port()
        config_path = directory / "sshd_config"
        config_path.write_text(
            _render_config(directory, port, host_key, authorized_keys, options or {}),
            encoding="utf-8",
        )
        known_hosts = directory / "known_hosts"
        known_hosts.write_text(
            f"[127.0.0.1]:{port} {_public_key_line(host_key)}\n", encoding="utf-8"
        )

        log_path = directory / f"sshd-{port}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sshd, "-D", "-e", "-f", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
            )

        server = SshdServer(
            host="127.0.0.1",
            port=port,
            username=getpass.getuser(),
            client_key_path=client_key,
            known_hosts_path=known_hosts,
            host_public_key=_public_key_line(host_key),
            config_path=config_path,
            log_path=log_path,
            process=process,
        )
        try:
            _wait_for_banner(server)
        except SshdStartError as exc:
            server.stop()
            last_error = exc
            if "Address already in use" not in server.log_text():
                raise
            continue

        return server

    assert last_error is not None
    raise last_error


def _generate_key(keygen: str, path: Path, comment: str) -> Path:
    subprocess.run(
        [keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )
    return path


def _public_key_line(private_key: Path) -> str:
    """Return "TYPE BASE64" from the key's .pub file, dropping the comment."""
    fields = private_key.with_name(private_key.name + ".pub").read_text(encoding="utf-8").split()
    return f"{fields[0]} {fields[1]}"


def _render_config(
    directory: Path,
    port: int,
    host_key: Path,
    authorized_keys: Path,
    overrides: Mapping[str, str],
) -> str:
    options = {
        "ListenAddress": f"127.0.0.1:{port}",
        "HostKey": str(host_key),
        "PidFile": str(directory / "sshd.pid"),
        "AuthorizedKeysFile": str(authorized_keys),
        "PubkeyAuthentication": "yes",
        "PasswordAuthentication": "no",
        "KbdInteractiveAuthentication": "no",
        "AllowTcpForwarding": "yes",
        "GatewayPorts": "no",
        "PermitOpen": "any",
        "PermitListen": "any",
        # authorized_keys lives under /tmp, and StrictModes rejects it below a world-writable
        # folder ("bad ownership or modes for directory /tmp").
        "StrictModes": "no",
        "UsePAM": "no",
        "UseDNS": "no",
        "X11Forwarding": "no",
        "PrintMotd": "no",
        "ClientAliveInterval": "5",
        "ClientAliveCountMax": "3",
        "LogLevel": "VERBOSE",
    }
    if os.geteuid() == 0:
        options["PermitRootLogin"] = "prohibit-password"
    options.update(overrides)

    return "".join(f"{keyword} {value}\n" for keyword, value in options.items())


def _wait_for_banner(server: SshdServer) -> None:
    """Return once sshd sends its "SSH-2.0-" identification line on the port."""
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise SshdStartError(
                f"sshd exited with status {server.process.returncode} before accepting "
                f"connections on port {server.port}; its log:\n{server.log_text()}"
            )

        try:
            with socket.create_connection((server.host, server.port), timeout=1.0) as probe:
                if probe.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        time.sleep(0.05)

    raise SshdStartError(
        f"sshd sent no SSH banner on port {server.port} within {_START_TIMEOUT} s; "
        f"its log:\n{server.log_text()}"
    )


def _descendants(root_pid: int) -> list[int]:
    """Return the ids of every process below *root_pid*, read from /proc (Linux only)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        # The command name in field 2 may contain spaces and parentheses, so the parent id
        # is the second field after the last ")".
        parent = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(parent, []).append(int(entry.name))

    found: list[int] = []
    pending = [root_pid]
    while pending:
        pid = pending.pop()
        for child in children.get(pid, []):
            found.append(child)
            pending.append(child)
    return found


def _is_running(pid: int) -> bool:
    """Return whether *pid* exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _signal(pid: int, signum: signal.Signals) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
