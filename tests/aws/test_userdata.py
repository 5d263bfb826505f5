"""The bastion's user-data: valid shell, an sshd drop-in sshd accepts, a valid systemd unit."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from ephemwork import cli
from ephemwork.aws.userdata import (
    UserDataInputs,
    render_sshd_drop_in,
    render_systemd_unit,
    render_user_data,
)
from helpers.sshd import SshdUnavailableError, find_ssh_keygen, find_sshd

INPUTS = UserDataInputs(team="payments", region="eu-west-1", binary_s3_uri="s3://b/e.pyz")


def sshd_config_with_drop_in(tmp_path: Path) -> tuple[str, Path]:
    """Write an sshd_config that includes the rendered drop-in; return sshd and the config."""
    try:
        sshd = find_sshd()
        keygen = find_ssh_keygen()
    except SshdUnavailableError as exc:
        pytest.skip(str(exc))
    host_key = tmp_path / "host_key"
    subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    drop_in = tmp_path / "50-ephemwork.conf"
    drop_in.write_text(render_sshd_drop_in(INPUTS))
    config = tmp_path / "sshd_config"
    config.write_text(f"HostKey {host_key}\nPidFile none\nInclude {drop_in}\n")
    Path("/run/sshd").mkdir(exist_ok=True)
    return sshd, config


class TestUserData:
    def test_valid_bash(self, tmp_path: Path) -> None:
        """bash -n accepts the rendered script."""
        script = tmp_path / "userdata.sh"
        script.write_text(render_user_data(INPUTS))
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr

    def test_downloads_zipapp(self) -> None:
        """The script copies the zipapp from the S3 URI."""
        assert "aws s3 cp --region eu-west-1 s3://b/e.pyz" in render_user_data(INPUTS)

    def test_installs_python(self) -> None:
        """The script installs Python 3.11."""
        assert "dnf install -y python3.11" in render_user_data(INPUTS)


class TestSshdDropIn:
    def test_accepted_by_sshd(self, tmp_path: Path) -> None:
        """sshd -t accepts a config that includes the drop-in."""
        sshd, config = sshd_config_with_drop_in(tmp_path)

        result = subprocess.run([sshd, "-t", "-f", str(config)], capture_output=True, text=True)

        assert result.returncode == 0, result.stderr

    def test_listen_on_tunnel_ports_only(self, tmp_path: Path) -> None:
        """sshd lets the tunnel user listen on exactly the tunnel ports of 127.0.0.1."""
        sshd, config = sshd_config_with_drop_in(tmp_path)

        # -T prints the settings in effect for a connection described by -C.
        result = subprocess.run(
            [sshd, "-T", "-f", str(config), "-C", "user=ephemwork,host=laptop,addr=10.0.0.9"],
            capture_output=True,
            text=True,
        )

        assert result.returncode == 0, result.stderr
        [line] = [line for line in result.stdout.splitlines() if line.startswith("permitlisten ")]
        expected = [f"127.0.0.1:{port}" for port in range(20000, 21000)]
        assert line.split()[1:] == expected

    def test_custom_port_range(self) -> None:
        """The drop-in and the unit follow a custom port range."""
        inputs = UserDataInputs(
            team="payments",
            region="eu-west-1",
            binary_s3_uri="s3://b/e.pyz",
            port_range=(30000, 30002),
        )
        assert "PermitListen 127.0.0.1:30000 127.0.0.1:30001 127.0.0.1:30002\n" in (
            render_sshd_drop_in(inputs)
        )
        assert "--port-range 30000-30002" in render_systemd_unit(inputs)

    def test_loopback_forwards_only(self) -> None:
        """Remote forwards listen on loopback and local forwards reach only the control API."""
        text = render_sshd_drop_in(INPUTS)
        assert "PermitListen 127.0.0.1:20000 127.0.0.1:20001 " in text
        assert ":*" not in text
        assert "127.0.0.1:7070 " not in text
        assert "PermitOpen 127.0.0.1:7070" in text
        assert "GatewayPorts no" in text

    def test_forced_command(self) -> None:
        """The forced command only waits, and a pty is allowed."""
        text = render_sshd_drop_in(INPUTS)
        assert "ForceCommand /bin/cat >/dev/null" in text
        assert "PermitTTY yes" in text


class TestSystemdUnit:
    def test_restarts_on_failure(self) -> None:
        """The unit restarts serve-bastion when it fails."""
        assert "Restart=on-failure" in render_systemd_unit(INPUTS)

    def test_exec_start_parses(self) -> None:
        """ExecStart's serve-bastion arguments are accepted by the CLI, ALB peers trusted."""
        exec_start = next(
            line.removeprefix("ExecStart=")
            for line in render_systemd_unit(INPUTS).splitlines()
            if line.startswith("ExecStart=")
        )
        arguments = shlex.split(exec_start)[2:]
        assert arguments[0] == "serve-bastion"

        command = cli.main.commands["serve-bastion"]
        context = command.make_context("serve-bastion", arguments[1:])

        assert context.params["trusted_proxies"] == (
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
        )
        assert context.params["control_listen"] == ("127.0.0.1", 7070)

    def test_verified(self, tmp_path: Path) -> None:
        """systemd-analyze verify accepts the unit, with ExecStart's Python made local."""
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            pytest.skip("systemd-analyze is not installed")
        # The AMI's /usr/bin/python3.11 may be missing here, and verify checks ExecStart.
        python = shutil.which("python3") or "/usr/bin/python3"
        unit = tmp_path / "ephemwork-bastion.service"
        unit.write_text(
            render_systemd_unit(
                UserDataInputs(
                    team="payments", region="eu-west-1", binary_s3_uri="s3://b/e.pyz", python=python
                )
            )
        )
        result = subprocess.run(
            [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
        )
        if "Failed to" in result.stderr and "bus" in result.stderr.lower():
            pytest.skip(f"systemd-analyze cannot run here: {result.stderr.strip()}")
        assert result.returncode == 0, result.stderr
