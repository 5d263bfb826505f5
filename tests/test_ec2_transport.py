"""The ``ec2`` tunnel end to end: moto, a stand-in for ``aws ssm start-session`` and a real sshd.

What cannot run here is replaced, and only that: moto (on 127.0.0.1) stands in for EC2 and
EC2 Instance Connect; a script named ``aws`` on PATH stands in for the AWS CLI and
session-manager-plugin, asserts its exact arguments and bridges its stdin and stdout to a
local OpenSSH sshd; and, because moto does not deliver pushed keys to an instance, the test
appends the pushed public key to that sshd's authorized_keys, as EC2 Instance Connect's
AuthorizedKeysCommand does on a real bastion.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import asyncssh
import attrs
import boto3
import pytest
from aiohttp import web

from ephemwork.client import ssm
from ephemwork.client.tunnel import connect
from ephemwork.config import Ec2Tunnel
from ephemwork.errors import AwsSetupError
from ephemwork.targets import open_target
from helpers.moto import MotoServer
from helpers.sshd import SshdServer

REGION = "us-east-1"

_STAND_IN = """#!{python}
import json, os, socket, sys, threading
with open(os.environ["STAND_IN_ARGS"], "w") as out:
    json.dump(sys.argv[1:], out)
conn = socket.create_connection(("127.0.0.1", int(os.environ["STAND_IN_SSHD_PORT"])))
def pump_in():
    while data := os.read(0, 65536):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)
threading.Thread(target=pump_in, daemon=True).start()
while data := conn.recv(65536):
    os.write(1, data)
"""


def _write_stand_in(bin_dir: Path) -> None:
    bin_dir.mkdir()
    aws = bin_dir / "aws"
    aws.write_text(_STAND_IN.format(python=sys.executable))
    plugin = bin_dir / "session-manager-plugin"
    plugin.write_text("#!/bin/sh\nexit 0\n")
    for path in (aws, plugin):
        path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _run_bastion_instance(server: MotoServer) -> str:
    ec2 = boto3.client("ec2", endpoint_url=server.url, region_name=REGION)
    response = ec2.run_instances(
        ImageId="ami-12c6146b",
        MinCount=1,
        MaxCount=1,
        InstanceType="t4g.nano",
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": "ephemwork:managed", "Value": "true"},
                    {"Key": "ephemwork:team", "Value": "payments"},
                ],
            }
        ],
    )
    instance_id: str = response["Instances"][0]["InstanceId"]
    ec2.describe_instances(InstanceIds=[instance_id])  # moto moves it to running
    return instance_id


@pytest.fixture
def stand_in(
    tmp_path: Path, sshd: SshdServer, aws_env: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Put the stand-in aws command first on PATH; return the file its arguments go to."""
    bin_dir = tmp_path / "bin"
    _write_stand_in(bin_dir)
    args_file = tmp_path / "aws-args.json"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STAND_IN_ARGS", str(args_file))
    monkeypatch.setenv("STAND_IN_SSHD_PORT", str(sshd.port))

    authorized_keys = sshd.client_key_path.parent / "authorized_keys"
    original = ssm.push_key

    async def push_and_install(settings: Any, bastion: Any, public_key: str) -> None:
        await original(settings, bastion, public_key)
        with authorized_keys.open("a") as keys:
            keys.write(public_key + "\n")

    monkeypatch.setattr(ssm, "push_key", push_and_install)
    return args_file


async def _serve_hello(port: int) -> web.AppRunner:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hello from the laptop, path {request.path}")

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


class TestEc2Transport:
    async def test_exact_proxy_command(
        self, stand_in: Path, aws_env: MotoServer, sshd: SshdServer
    ) -> None:
        """The proxy command is aws ssm start-session with AWS-StartSSHSession on port 22."""
        instance_id = _run_bastion_instance(aws_env)
        tunnel = Ec2Tunnel(region=REGION, team="payments")

        async with open_target(tunnel) as target:
            target = attrs.evolve(target, username=sshd.username)
            conn = await connect(target)
            conn.close()
            await conn.wait_closed()

        arguments = json.loads(await asyncio.to_thread(stand_in.read_text))
        assert arguments == [
            "ssm",
            "start-session",
            "--target",
            instance_id,
            "--document-name",
            "AWS-StartSSHSession",
            "--parameters",
            "portNumber=22",
            "--region",
            REGION,
            "--endpoint-url",
            aws_env.url,
        ]

    async def test_request_through_reverse_forward(
        self, stand_in: Path, aws_env: MotoServer, sshd: SshdServer, free_port: Any
    ) -> None:
        """A request to a reverse-forwarded port on the bastion reaches the laptop's server."""
        _run_bastion_instance(aws_env)
        dev_port = free_port()
        runner = await _serve_hello(dev_port)
        tunnel = Ec2Tunnel(region=REGION, team="payments")
        try:
            async with open_target(tunnel) as target:
                # The local sshd runs as this test's user, not as the bastion's ephemwork.
                target = attrs.evolve(target, username=sshd.username)
                conn = await connect(target)
                try:
                    listener = await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", dev_port)
                    reader, writer = await asyncio.open_connection("127.0.0.1", listener.get_port())
                    writer.write(b"GET /route HTTP/1.0\r\nHost: x\r\n\r\n")
                    body = await asyncio.wait_for(reader.read(), 10)
                    writer.close()
                finally:
                    conn.close()
                    await conn.wait_closed()
        finally:
            await runner.cleanup()

        assert body.endswith(b"hello from the laptop, path /route")

    async def test_plugin_missing(
        self, tmp_path: Path, aws_env: MotoServer, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without session-manager-plugin on PATH the error names the plugin."""
        _run_bastion_instance(aws_env)
        bin_dir = tmp_path / "bin"
        _write_stand_in(bin_dir)
        (bin_dir / "session-manager-plugin").unlink()
        monkeypatch.setenv("PATH", str(bin_dir))

        with pytest.raises(AwsSetupError, match="session-manager-plugin"):
            async with open_target(Ec2Tunnel(region=REGION, team="payments")):
                pass

    async def test_instance_not_found(self, stand_in: Path, aws_env: MotoServer) -> None:
        """An unknown instance_id is reported with the id and the region."""
        tunnel = Ec2Tunnel(region=REGION, instance_id="i-0123456789abcdef0")

        with pytest.raises(AwsSetupError, match="i-0123456789abcdef0"):
            async with open_target(tunnel):
                pass

    async def test_key_pushed_for_ephemwork(
        self, stand_in: Path, aws_env: MotoServer, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Each connection attempt pushes a new in-memory Ed25519 key for OS user ephemwork."""
        _run_bastion_instance(aws_env)
        pushed: list[str] = []
        install = ssm.push_key

        async def record_push(settings: Any, bastion: Any, public_key: str) -> None:
            pushed.append(public_key)
            await install(settings, bastion, public_key)

        monkeypatch.setattr(ssm, "push_key", record_push)

        async with open_target(Ec2Tunnel(region=REGION, team="payments")) as target:
            assert target.prepare_keys is not None
            first = await target.prepare_keys()
            second = await target.prepare_keys()

        assert target.username == "ephemwork"
        assert len(first) == 1
        assert isinstance(first[0], asyncssh.SSHKey)
        assert first[0].algorithm == b"ssh-ed25519"
        assert len(second) == 1
        assert second[0].public_data != first[0].public_data
        assert len(pushed) == 2
        assert pushed[1] == second[0].export_public_key("openssh").decode().strip()
