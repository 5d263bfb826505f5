"""Bodies of the ``ephemwork bastion`` commands: print the plan, or run it with ``--live``.

Without ``--live`` nothing here imports aioboto3 or botocore, and nothing reads credentials.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import click

from ephemwork.aws.albrules import AlbValues, render_alb_rules
from ephemwork.aws.plan import BastionSpec, destroy_plan, init_plan, render_plan, status_plan
from ephemwork.aws.session import AwsSettings
from ephemwork.config import Ec2Tunnel, load_config
from ephemwork.errors import ConfigError, UsageError


@attrs.frozen
class CommonOptions:
    """Options every ``bastion`` command shares; None means "from ephemwork.toml"."""

    config_path: Path | None
    team: str | None
    region: str | None
    profile: str | None
    endpoint_url: str | None


@attrs.frozen
class Resolved:
    """The team, AWS settings and ``[tunnel]`` values of one command."""

    team: str
    settings: AwsSettings
    tunnel: Ec2Tunnel


def resolve(options: CommonOptions, *, require_team: bool = True) -> Resolved:
    """Merge the flags with ``[tunnel]`` of ephemwork.toml when it is an ec2 tunnel."""
    tunnel = Ec2Tunnel()
    try:
        config = load_config(options.config_path)
    except ConfigError:
        if options.config_path is not None:
            raise
    else:
        if isinstance(config.tunnel, Ec2Tunnel):
            tunnel = config.tunnel

    team = options.team or tunnel.team or ""
    if require_team and not team:
        raise UsageError(
            'No team given; pass --team NAME or add team = "NAME" to the [tunnel] table.'
        )
    settings = AwsSettings.resolve(
        options.region or tunnel.region,
        options.profile or tunnel.profile,
        options.endpoint_url,
        configured_endpoint=tunnel.endpoint_url,
    )
    return Resolved(team=team, settings=settings, tunnel=tunnel)


@attrs.frozen
class InitOptions:
    """The flags of ``bastion init``."""

    subnet_id: str
    alb_security_group_id: str
    binary_s3_uri: str
    ami_id: str | None
    instance_type: str | None


async def run_init(common: CommonOptions, options: InitOptions, *, live: bool) -> None:
    """Print the plan of ``init``, or create the bastion with *live*."""
    resolved = resolve(common)
    spec = BastionSpec(
        team=resolved.team,
        region=resolved.settings.region,
        instance_type=options.instance_type or resolved.tunnel.instance_type,
        subnet_id=options.subnet_id,
        alb_security_group_id=options.alb_security_group_id,
        binary_s3_uri=options.binary_s3_uri,
        ami_id=options.ami_id,
        control_port=resolved.tunnel.control_port,
        proxy_port=resolved.tunnel.proxy_port,
    )
    if not live:
        click.echo(render_plan(init_plan(spec), resolved.settings.describe()))
        return

    from ephemwork.aws.provision import Provisioner

    result = await Provisioner(resolved.settings, echo=click.echo).init(spec)
    if not result.changed:
        click.echo(f"Bastion of team {spec.team!r} already exists; nothing changed.")
    click.echo(f"instance id: {result.instance_id}")
    click.echo(f"private ip: {result.private_ip}")
    click.echo(f"security group id: {result.security_group_id}")
    click.echo(f"vpc id: {result.vpc_id}")


async def run_destroy(common: CommonOptions, *, live: bool) -> None:
    """Print the plan of ``destroy``, or remove the bastion with *live*."""
    resolved = resolve(common)
    if not live:
        plan = destroy_plan(resolved.team, resolved.tunnel.instance_id)
        click.echo(render_plan(plan, resolved.settings.describe()))
        return

    from ephemwork.aws.provision import Provisioner

    removed = await Provisioner(resolved.settings, echo=click.echo).destroy(resolved.team)
    if not removed:
        click.echo(f"No resources of team {resolved.team!r} found; nothing to remove.")
    else:
        click.echo(f"Removed {len(removed)} resources of team {resolved.team!r}.")


async def run_status(common: CommonOptions, *, live: bool) -> None:
    """Print the plan of ``status``, or the bastion's state with *live*."""
    resolved = resolve(common)
    if not live:
        plan = status_plan(resolved.team, resolved.tunnel.instance_id)
        click.echo(render_plan(plan, resolved.settings.describe()))
        return

    from ephemwork.aws.provision import Provisioner

    status = await Provisioner(resolved.settings, echo=click.echo).status(
        resolved.team, resolved.tunnel.instance_id
    )
    click.echo(f"instance id: {status.instance_id}")
    click.echo(f"state: {status.state}")
    click.echo(f"private ip: {status.private_ip}")
    click.echo(f"vpc id: {status.vpc_id}")
    click.echo(f"security group ids: {', '.join(status.security_group_ids)}")
    click.echo(f"ssm ping status: {status.ping_status}")
    click.echo(f"serve-bastion health: {status.bastion_health}")


@attrs.frozen
class AlbOptions:
    """The flags of ``bastion alb-rules``."""

    output_format: str
    alb_security_group_id: str
    listener_arn: str
    priority: int
    vpc_id: str | None
    bastion_private_ip: str | None
    bastion_security_group_id: str | None


async def run_alb_rules(common: CommonOptions, options: AlbOptions, *, live: bool) -> None:
    """Print the ALB side; with *live*, fill in the bastion's values from AWS."""
    resolved = resolve(common)
    vpc_id = options.vpc_id or "VPC_ID"
    private_ip = options.bastion_private_ip or "BASTION_PRIVATE_IP"
    group_id = options.bastion_security_group_id or "BASTION_SECURITY_GROUP_ID"
    if live:
        from ephemwork.aws.provision import Provisioner

        status = await Provisioner(resolved.settings, echo=click.echo).status(
            resolved.team, resolved.tunnel.instance_id
        )
        vpc_id, private_ip = status.vpc_id, status.private_ip
        group_id = status.security_group_ids[0] if status.security_group_ids else group_id

    values = AlbValues(
        team=resolved.team,
        vpc_id=vpc_id,
        bastion_private_ip=private_ip,
        alb_security_group_id=options.alb_security_group_id,
        bastion_security_group_id=group_id,
        listener_arn=options.listener_arn,
        priority=options.priority,
        proxy_port=resolved.tunnel.proxy_port,
    )
    click.echo(render_alb_rules(values, options.output_format), nl=False)


async def run_upload(common: CommonOptions, pyz: Path, uri: str, *, live: bool) -> None:
    """Print what ``upload`` would do, or upload *pyz* to *uri* with *live*."""
    resolved = resolve(common, require_team=False)
    if not live:
        click.echo(
            f"Plan: s3:PutObject {uri} from {pyz} ({resolved.settings.describe()}). "
            "Nothing is called; add --live to run it."
        )
        return

    from ephemwork.aws.upload import upload_pyz

    await upload_pyz(resolved.settings, pyz, uri)
    click.echo(f"uploaded {pyz} to {uri}")
