"""The ``ec2`` tunnel: SSH to the bastion through SSM Session Manager with a one-use key.

For each connection this module

1. finds the bastion by ``instance_id`` or by its ``ephemwork:*`` tags;
2. generates an Ed25519 key in memory and pushes its public half with EC2 Instance Connect
   for the ``ephemwork`` OS user, which lets sshd accept it for 60 seconds;
3. describes the SSH connection with ``aws ssm start-session --document-name
   AWS-StartSSHSession`` as its proxy command, so the SSH stream runs through
   session-manager-plugin's stdin and stdout and nothing listens on the laptop.

The caller must connect right after `ec2_target` returns, inside the key's window.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import asyncssh
import attrs
import structlog

from ephemwork.aws.errors import map_aws_errors
from ephemwork.aws.plan import LIVE_STATES, tag_filters
from ephemwork.aws.session import AwsSettings
from ephemwork.client.tunnel import TunnelTarget
from ephemwork.config import Ec2Tunnel
from ephemwork.errors import AwsSetupError, ConfigError

log = structlog.get_logger(__name__)

SSM_DOCUMENT = "AWS-StartSSHSession"
OS_USER = "ephemwork"
SSH_PORT = 22
SESSION_MANAGER_PLUGIN = "session-manager-plugin"


@attrs.frozen
class Bastion:
    """The bastion instance found in the tunnel's region."""

    instance_id: str
    state: str
    private_ip: str
    availability_zone: str


def settings_for(tunnel: Ec2Tunnel) -> AwsSettings:
    """Return the AWS settings of *tunnel*: its region, profile and endpoint."""
    return AwsSettings.resolve(
        tunnel.region, tunnel.profile, configured_endpoint=tunnel.endpoint_url
    )


async def find_bastion(settings: AwsSettings, tunnel: Ec2Tunnel) -> Bastion:
    """Find the running bastion of *tunnel*, or raise an error that names the fix."""
    if tunnel.instance_id is None and tunnel.team is None:
        raise ConfigError(
            'tunnel.type = "ec2" needs instance_id = "i-..." or team = "NAME" (the --team '
            "of `ephemwork bastion init`) in [tunnel]."
        )

    params: dict[str, Any]
    if tunnel.instance_id is not None:
        params = {"InstanceIds": [tunnel.instance_id]}
        subject = tunnel.instance_id
    else:
        assert tunnel.team is not None
        states = {"Name": "instance-state-name", "Values": list(LIVE_STATES)}
        params = {"Filters": [*tag_filters(tunnel.team), states]}
        subject = f"team {tunnel.team}"

    async with settings.client("ec2") as ec2:
        with map_aws_errors("ec2:DescribeInstances", settings, subject=subject):
            response = await ec2.describe_instances(**params)
    instances = [i for r in response["Reservations"] for i in r["Instances"]]
    if not instances:
        raise AwsSetupError(
            f"No bastion found for {subject} in region {settings.region!r}; check "
            "tunnel.region and tunnel.team, or run `ephemwork bastion init --live`."
        )

    instance = instances[0]
    bastion = Bastion(
        instance_id=instance["InstanceId"],
        state=instance["State"]["Name"],
        private_ip=instance.get("PrivateIpAddress", ""),
        availability_zone=instance.get("Placement", {}).get("AvailabilityZone", ""),
    )
    if bastion.state != "running":
        raise AwsSetupError(
            f"Bastion {bastion.instance_id!r} is {bastion.state!r}, not running; start it in "
            "the EC2 console or run `ephemwork bastion init --live`."
        )
    log.info("ssm.bastion_found", instance_id=bastion.instance_id, region=settings.region)
    return bastion


async def push_key(settings: AwsSettings, bastion: Bastion, public_key: str) -> None:
    """Let sshd on *bastion* accept *public_key* for user ``ephemwork`` for 60 seconds."""
    async with settings.client("ec2-instance-connect") as connect:
        with map_aws_errors(
            "ec2-instance-connect:SendSSHPublicKey", settings, subject=bastion.instance_id
        ):
            await connect.send_ssh_public_key(
                InstanceId=bastion.instance_id, InstanceOSUser=OS_USER, SSHPublicKey=public_key
            )
    log.info("ssm.key_pushed", instance_id=bastion.instance_id, os_user=OS_USER)


def find_aws_cli() -> str:
    """Return the path of the AWS CLI, after checking that session-manager-plugin exists."""
    aws = shutil.which("aws")
    if aws is None:
        raise AwsSetupError(
            "The AWS CLI ('aws') is not on PATH; install it (https://aws.amazon.com/cli/) "
            "and session-manager-plugin, then try again."
        )
    if shutil.which(SESSION_MANAGER_PLUGIN) is None:
        raise AwsSetupError(
            f"{SESSION_MANAGER_PLUGIN!r} is not on PATH; the AWS CLI needs it for SSM "
            "sessions. Install the Session Manager plugin from the AWS documentation "
            "('Install the Session Manager plugin for the AWS CLI')."
        )
    return aws


def proxy_command(aws: str, settings: AwsSettings, instance_id: str) -> list[str]:
    """Return the command whose stdin and stdout carry SSH to *instance_id* through SSM."""
    argv = [
        aws,
        "ssm",
        "start-session",
        "--target",
        instance_id,
        "--document-name",
        SSM_DOCUMENT,
        "--parameters",
        f"portNumber={SSH_PORT}",
        "--region",
        settings.region,
    ]
    if settings.profile:
        argv += ["--profile", settings.profile]
    if settings.endpoint_url:
        argv += ["--endpoint-url", settings.endpoint_url]
    return argv


async def ec2_target(tunnel: Ec2Tunnel) -> TunnelTarget:
    """Find the bastion, push a fresh key and describe the SSH connection through SSM."""
    settings = settings_for(tunnel)
    aws = find_aws_cli()
    bastion = await find_bastion(settings, tunnel)

    async def prepare_keys() -> list[asyncssh.SSHKey]:
        # A new key per connection, reconnects included: nothing is written to disk and
        # nothing outlives the 60-second window in which sshd accepts it.
        key = asyncssh.generate_private_key("ssh-ed25519", comment=f"ephemwork-{os.getpid()}")
        public_key = key.export_public_key("openssh").decode().strip()
        await push_key(settings, bastion, public_key)
        return [key]

    public_url = tunnel.public_url or f"http://{bastion.private_ip}:{tunnel.proxy_port}/"
    return TunnelTarget(
        host=bastion.instance_id,
        port=SSH_PORT,
        username=OS_USER,
        client_keys=None,
        prepare_keys=prepare_keys,
        # SSM opens the channel to the instance we named, authenticated by IAM; the host's
        # key is new on each bastion and published nowhere we could check it against.
        known_hosts=None,
        control_port=tunnel.control_port,
        proxy_port=tunnel.proxy_port,
        public_url=public_url,
        description=f"ec2 {OS_USER}@{bastion.instance_id} via SSM ({settings.region})",
        # OpenSSH's sshd turns on TCP_NODELAY only while a pty session is open.
        want_pty=True,
        proxy_command=proxy_command(aws, settings, bastion.instance_id),
    )
