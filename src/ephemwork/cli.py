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
            return asyncio.run(function(*args, **kwargs))
        except EphemworkError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper


def report_errors(function: Callable[P, R]) -> Callable[P, R]:
    """Turn our errors raised by a synchronous command body into one line and an exit code."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return function(*args, **kwargs)
        except EphemworkError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper


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
    help="Log line format; auto means console on a terminal and JSON otherwise.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="Lowest level of log lines to print.",
)
@click.pass_context
def main(ctx: click.Context, log_format: LogFormat, log_level: str) -> None:
    """Route staging requests that carry X-Ephemwork: USER:SERVICE to this laptop."""
    from ephemwork.logs import configure_logging

    server = ctx.invoked_subcommand == "serve-bastion"
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
) -> None:
    """Run the bastion: header proxy, control API and session registry."""
    from ephemwork.bastion.server import BastionOptions, serve_bastion
    from ephemwork.home import ephemwork_home

    if state_dir is None:
        state_dir = ephemwork_home() / "bastion" if dev else Path("/var/lib/ephemwork")
    if dev and authorized_keys is None:
        authorized_keys = ephemwork_home() / "authorized_keys"

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
    )
    await serve_bastion(options)
