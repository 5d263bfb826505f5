"""The ``ephemwork`` command line: client commands for the laptop and ``serve-bastion``.

Command modules are imported inside each command, so ``--help`` and ``status`` do not pay
for aiohttp, asyncssh or AWS imports they never use.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import click

from ephemwork import __version__
from ephemwork.errors import EphemworkError

if TYPE_CHECKING:
    from ephemwork.logs import LogFormat

P = ParamSpec("P")
R = TypeVar("R")


class HostPort(click.ParamType[tuple[str, int]]):
    """A ``HOST:PORT`` pair; IPv6 hosts go in brackets, as in ``[::1]:7070``."""

    name = "HOST:PORT"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, int]:
        if isinstance(value, tuple):
            return value

        host, separator, port_text = str(value).rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not separator or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            self.fail(f"{value!r} is not HOST:PORT, for example 127.0.0.1:7070.", param, ctx)
        return (host, int(port_text))


class PortRange(click.ParamType[tuple[int, int]]):
    """An inclusive ``LOW-HIGH`` range of TCP ports."""

    name = "LOW-HIGH"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value

        low_text, separator, high_text = str(value).partition("-")
        valid = separator and low_text.isdigit() and high_text.isdigit()
        if not valid or not 1024 <= int(low_text) <= int(high_text) <= 65535:
            self.fail(
                f"{value!r} is not a port range; use LOW-HIGH with 1024 <= LOW <= HIGH <= 65535, "
                "for example 20000-20999.",
                param,
                ctx,
            )
        return (int(low_text), int(high_text))


def run_async(function: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, R]:
    """Run an async command body and turn our errors into one line and an exit code."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                return runner.run(function(*args, **kwargs))
        except EphemworkError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """Return uvloop's event loop factory where uvloop is installed, else None (asyncio's).

    uvloop's transports and polling cost less CPU per request than asyncio's own, which
    raised the relayed requests per second by about 5 % (docs/benchmarks.md). It is
    imported here, not at the top, so ``--help`` does not pay for it.
    """
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Path of ephemwork.toml. Default: the nearest one in this folder or a parent.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ephemwork")
@click.option(
    "--log-format",
    type=click.Choice(["auto", "console", "json"]),
    default="auto",
    show_default=True,
    help="Log line format. auto: console for client commands; for serve-bastion, "
    "console on a terminal and JSON otherwise (files, pipes, systemd).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default=None,
    help="Lowest level of log lines to print. Default: info for serve-bastion; warning for "
    "client commands, whose progress is printed as plain lines.",
)
@click.pass_context
def main(ctx: click.Context, log_format: LogFormat, log_level: str | None) -> None:
    """Route staging requests that carry X-Ephemwork: USER:SERVICE to this laptop."""
    from ephemwork.logs import configure_logging

    server = ctx.invoked_subcommand == "serve-bastion"
    if log_level is None:
        log_level = "info" if server else "warning"
    configure_logging(log_format, log_level, server=server)


@main.command()
@click.argument("services", nargs=-1, required=True)
@config_option
@click.option(
    "--takeover",
    is_flag=True,
    help="Replace a live session for the same USER:SERVICE instead of failing.",
)
@run_async
async def up(services: tuple[str, ...], config_path: Path | None, takeover: bool) -> None:
    """Start SERVICES' dev servers and route their requests here until Ctrl-C."""
    from ephemwork.commands.up import run_up

    await run_up(config_path, list(services), takeover=takeover)


@main.command()
@click.argument("service", required=False)
@config_option
@run_async
async def down(service: str | None, config_path: Path | None) -> None:
    """Stop the running `up` for SERVICE, or every session of this user."""
    from ephemwork.commands.down import run_down

    await run_down(config_path, service)


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the sessions as JSON.")
@run_async
async def status(config_path: Path | None, as_json: bool) -> None:
    """Show this user's sessions."""
    from ephemwork.commands.status import run_status

    await run_status(config_path, as_json=as_json)


@main.command("serve-bastion")
@click.option(
    "--listen",
    type=HostPort(),
    default="0.0.0.0:80",
    show_default=True,
    help="Address of the proxy that the ALB sends routed requests to.",
)
@click.option(
    "--control-listen",
    type=HostPort(),
    default="127.0.0.1:7070",
    show_default=True,
    help="Address of the control API; must be loopback unless --allow-remote-control.",
)
@click.option(
    "--allow-remote-control",
    is_flag=True,
    help="Allow a non-loopback --control-listen. Anyone who reaches it can register routes.",
)
@click.option(
    "--port-range",
    type=PortRange(),
    default="20000-20999",
    show_default=True,
    help="Loopback ports handed to sessions for their reverse forwards.",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of the session registry. Default: /var/lib/ephemwork, "
    "or $EPHEMWORK_HOME/bastion with --dev.",
)
@click.option(
    "--lease-ttl",
    type=click.FloatRange(min=1.0),
    default=60.0,
    show_default=True,
    help="Seconds a session stays routed without a lease renewal.",
)
@click.option(
    "--dev",
    is_flag=True,
    help="Also run an embedded SSH server, for trying ephemwork without AWS.",
)
@click.option(
    "--ssh-listen",
    type=HostPort(),
    default="127.0.0.1:2222",
    show_default=True,
    help="Address of the embedded SSH server (with --dev).",
)
@click.option(
    "--authorized-keys",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Public keys the embedded SSH server accepts (with --dev). "
    "Default: $EPHEMWORK_HOME/authorized_keys.",
)
@click.option(
    "--host-key",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Private host key of the embedded SSH server. Default: generated in --state-dir.",
)
@click.option(
    "--cors-allow-origin",
    "cors_allow_origins",
    multiple=True,
    metavar="PATTERN",
    help="Origin whose CORS preflights for X-Ephemwork the bastion allows; glob patterns "
    "such as https://*.staging.example.com. Repeatable. Default: none.",
)
@click.option(
    "--header-timeout",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds a client has to send a request's headers.",
)
@click.option(
    "--keepalive-timeout",
    type=click.FloatRange(min=0.1),
    default=75.0,
    show_default=True,
    help="Seconds an idle keep-alive connection to the proxy stays open.",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="Seconds to connect to a tunnel port.",
)
@click.option(
    "--read-timeout",
    type=click.FloatRange(min=0.1),
    default=75.0,
    show_default=True,
    help="Seconds of silence from a dev server before the request fails with 504.",
)
@click.option(
    "--websocket-idle-timeout",
    type=click.FloatRange(min=0.1),
    default=300.0,
    show_default=True,
    help="Seconds a WebSocket may carry no frame in either direction before it is closed.",
)
@click.option(
    "--max-connections-per-client",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Concurrent proxy connections one client address may hold.",
)
@click.option(
    "--trusted-proxy",
    "trusted_proxies",
    multiple=True,
    metavar="CIDR",
    help="Load balancer address or subnet whose X-Forwarded-For names the client for "
    "--max-connections-per-client; repeatable. Default: none, so the cap counts the peer.",
)
@run_async
async def serve_bastion(
    listen: tuple[str, int],
    control_listen: tuple[str, int],
    allow_remote_control: bool,
    port_range: tuple[int, int],
    state_dir: Path | None,
    lease_ttl: float,
    dev: bool,
    ssh_listen: tuple[str, int],
    authorized_keys: Path | None,
    host_key: Path | None,
    cors_allow_origins: tuple[str, ...],
    header_timeout: float,
    keepalive_timeout: float,
    connect_timeout: float,
    read_timeout: float,
    websocket_idle_timeout: float,
    max_connections_per_client: int,
    trusted_proxies: tuple[str, ...],
) -> None:
    """Run the bastion: header proxy, control API and session registry."""
    from ephemwork.bastion.connections import ConnectionLimits, parse_trusted_proxy
    from ephemwork.bastion.proxy import ProxyTimeouts
    from ephemwork.bastion.server import BastionOptions, serve_bastion
    from ephemwork.home import ephemwork_home

    if state_dir is None:
        state_dir = ephemwork_home() / "bastion" if dev else Path("/var/lib/ephemwork")
    if dev and authorized_keys is None:
        authorized_keys = ephemwork_home() / "authorized_keys"
    try:
        trusted_networks = tuple(parse_trusted_proxy(value) for value in trusted_proxies)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--trusted-proxy'") from None

    options = BastionOptions(
        state_dir=state_dir,
        listen=listen,
        control_listen=control_listen,
        allow_remote_control=allow_remote_control,
        port_range=port_range,
        lease_ttl=lease_ttl,
        ssh_listen=ssh_listen if dev else None,
        authorized_keys=authorized_keys if dev else None,
        host_key=host_key,
        proxy_timeouts=ProxyTimeouts(
            connect=connect_timeout, read=read_timeout, websocket_idle=websocket_idle_timeout
        ),
        connection_limits=ConnectionLimits(
            header_timeout=header_timeout,
            keepalive_timeout=keepalive_timeout,
            max_per_client=max_connections_per_client,
            trusted_proxies=trusted_networks,
        ),
        cors_allow_origins=cors_allow_origins,
    )
    await serve_bastion(options)


@main.group()
def bastion() -> None:
    """Provision the EC2 bastion; every command prints its plan unless --live is given."""


def _bastion_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """The options every `bastion` command shares."""
    options = [
        config_option,
        click.option("--live", is_flag=True, help="Make the AWS calls instead of printing them."),
        click.option("--team", default=None, help="Team name in the tags. Default: tunnel.team."),
        click.option("--region", default=None, help="AWS region. Default: tunnel.region."),
        click.option("--profile", default=None, help="AWS profile. Default: tunnel.profile."),
        click.option(
            "--endpoint-url",
            default=None,
            help="Endpoint of every AWS service, such as a local test server. "
            "Default: $EPHEMWORK_AWS_ENDPOINT_URL, then tunnel.endpoint_url.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _common(**values: Any) -> Any:
    from ephemwork.aws.commands import CommonOptions

    return CommonOptions(
        config_path=values["config_path"],
        team=values["team"],
        region=values["region"],
        profile=values["profile"],
        endpoint_url=values["endpoint_url"],
    )


@bastion.command("init")
@_bastion_options
@click.option("--subnet-id", required=True, help="Private subnet of the bastion.")
@click.option("--alb-security-group-id", required=True, help="Security group of the staging ALB.")
@click.option(
    "--bastion-binary-s3-uri",
    required=True,
    help="s3://BUCKET/KEY of ephemwork.pyz built with --target linux-aarch64.",
)
@click.option("--ami-id", default=None, help="arm64 AMI. Default: latest Amazon Linux 2023.")
@click.option("--instance-type", default=None, help="Default: tunnel.instance_type (t4g.nano).")
@run_async
async def bastion_init(
    live: bool,
    subnet_id: str,
    alb_security_group_id: str,
    bastion_binary_s3_uri: str,
    ami_id: str | None,
    instance_type: str | None,
    **common: Any,
) -> None:
    """Create the bastion's IAM role, security group and instance."""
    from ephemwork.aws.commands import InitOptions, run_init

    options = InitOptions(
        subnet_id=subnet_id,
        alb_security_group_id=alb_security_group_id,
        binary_s3_uri=bastion_binary_s3_uri,
        ami_id=ami_id,
        instance_type=instance_type,
    )
    await run_init(_common(**common), options, live=live)


@bastion.command("destroy")
@_bastion_options
@run_async
async def bastion_destroy(live: bool, **common: Any) -> None:
    """Terminate the bastion and delete its security group, instance profile and role."""
    from ephemwork.aws.commands import run_destroy

    await run_destroy(_common(**common), live=live)


@bastion.command("status")
@_bastion_options
@run_async
async def bastion_status(live: bool, **common: Any) -> None:
    """Show the bastion's state, SSM ping status and serve-bastion health."""
    from ephemwork.aws.commands import run_status

    await run_status(_common(**common), live=live)


@bastion.command("alb-rules")
@_bastion_options
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["cdk-python", "cloudformation", "terraform"]),
    default="terraform",
    show_default=True,
)
@click.option("--alb-security-group-id", default="ALB_SECURITY_GROUP_ID")
@click.option("--listener-arn", default="LISTENER_ARN", help="ARN of the staging ALB's listener.")
@click.option("--priority", type=click.IntRange(1, 49999), default=10, show_default=True)
@click.option("--vpc-id", default=None, help="Without --live: the bastion's VPC.")
@click.option("--bastion-private-ip", default=None, help="Without --live: the bastion's IP.")
@click.option("--bastion-security-group-id", default=None, help="Without --live: its group.")
@run_async
async def bastion_alb_rules(
    live: bool,
    output_format: str,
    alb_security_group_id: str,
    listener_arn: str,
    priority: int,
    vpc_id: str | None,
    bastion_private_ip: str | None,
    bastion_security_group_id: str | None,
    **common: Any,
) -> None:
    """Print the ALB target group, rules and egress; --live fills in the bastion's values."""
    from ephemwork.aws.commands import AlbOptions, run_alb_rules

    options = AlbOptions(
        output_format=output_format,
        alb_security_group_id=alb_security_group_id,
        listener_arn=listener_arn,
        priority=priority,
        vpc_id=vpc_id,
        bastion_private_ip=bastion_private_ip,
        bastion_security_group_id=bastion_security_group_id,
    )
    await run_alb_rules(_common(**common), options, live=live)


@bastion.command("upload")
@_bastion_options
@click.argument("pyz", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("uri")
@run_async
async def bastion_upload(live: bool, pyz: Path, uri: str, **common: Any) -> None:
    """Upload PYZ (built with --target linux-aarch64) to the S3 object URI."""
    from ephemwork.aws.commands import run_upload

    await run_upload(_common(**common), pyz, uri, live=live)
