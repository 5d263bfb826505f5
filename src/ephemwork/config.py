"""``ephemwork.toml``: discovery, parsing and validation into attrs classes.

Every mistake becomes one `ConfigError` line that names the file, the key and the fix.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, TypeVar

import attrs
import cattrs

from ephemwork.errors import ConfigError, InvalidNameError
from ephemwork.identity import validate_name

CONFIG_FILE_NAME = "ephemwork.toml"

RESTART_POLICIES = ("on-failure", "never")

T = TypeVar("T")


@attrs.frozen
class LocalTunnel:
    """``type = "local"``: ``up`` runs a bastion in-process with an embedded SSH server."""

    type: str = "local"
    # Port on 127.0.0.1 where the in-process bastion's proxy listens.
    proxy_port: int = 8080


@attrs.frozen
class SshTunnel:
    """``type = "ssh"``: a bastion reached with plain SSH, host key checked against known_hosts."""

    host: str
    type: str = "ssh"
    port: int = 22
    user: str = "ephemwork"
    identity_file: str | None = None
    # None means the user's ~/.ssh/known_hosts, as the OpenSSH client does.
    known_hosts: str | None = None
    # The bastion's control API port on its own loopback, reached through the SSH connection.
    control_port: int = 7070
    # The bastion's proxy port on its own loopback, used by `status` to probe a route.
    proxy_port: int = 80
    # The URL that reaches the bastion's proxy (usually the staging ALB), shown in the curl hint.
    public_url: str | None = None


@attrs.frozen
class Ec2Tunnel:
    """``type = "ec2"``: a bastion on EC2 reached through SSM Session Manager."""

    type: str = "ec2"
    region: str = "us-east-1"
    instance_type: str = "t4g.nano"
    # The bastion is found by instance_id, or else by the tags ephemwork:managed=true and
    # ephemwork:team=<team> that `ephemwork bastion init` puts on it.
    instance_id: str | None = None
    team: str | None = None
    # AWS profile for every AWS call; None means the default credential chain.
    profile: str | None = None
    # Endpoint of every AWS service, such as a local test server; EPHEMWORK_AWS_ENDPOINT_URL
    # overrides it.
    endpoint_url: str | None = None
    control_port: int = 7070
    proxy_port: int = 80
    public_url: str | None = None


TunnelConfig = LocalTunnel | SshTunnel | Ec2Tunnel

TUNNEL_TYPES: dict[str, type[LocalTunnel] | type[SshTunnel] | type[Ec2Tunnel]] = {
    "local": LocalTunnel,
    "ssh": SshTunnel,
    "ec2": Ec2Tunnel,
}


@attrs.frozen
class ServiceConfig:
    """One ``[service.NAME]`` table: how to build, run and health-check a dev server."""

    port: int
    name: str = ""
    build_command: str | None = None
    # Without a run command, `up` expects the developer to start the dev server themselves.
    run_command: str | None = None
    # Without a health check path, `up` waits until the port accepts TCP connections.
    health_check_path: str | None = None
    # Seconds to wait for the health check before giving up.
    health_check_timeout: float = 60.0
    # Working directory of the commands, relative to the folder of ephemwork.toml.
    cwd: str | None = None
    env: dict[str, str] = attrs.field(factory=dict)
    # Env files read once when the dev server first starts, relative to ephemwork.toml's
    # folder; ``env_file = "a.env"`` in the file is stored as ``["a.env"]``.
    env_file: list[str] = attrs.field(factory=list)
    # Seconds between SIGTERM and SIGKILL when the dev server is stopped.
    stop_timeout: float = 5.0
    # "on-failure": restart the dev server with backoff after a non-zero exit; "never".
    restart: str = "on-failure"


@attrs.frozen
class Config:
    """A parsed and validated ``ephemwork.toml``."""

    path: Path
    tunnel: TunnelConfig
    services: dict[str, ServiceConfig]

    @property
    def root(self) -> Path:
        """The folder that contains ``ephemwork.toml``; commands run relative to it."""
        return self.path.parent

    def service(self, name: str) -> ServiceConfig:
        """Return the service called *name*, or raise `ConfigError` listing the known ones."""
        try:
            return self.services[name]
        except KeyError:
            known = ", ".join(sorted(self.services)) or "none"
            raise ConfigError(
                f"{self.path}: no [service.{name}] table (services defined: {known})."
            ) from None


def find_config(start: Path | None = None) -> Path:
    """Return the nearest ``ephemwork.toml`` in *start* or one of its parents."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / CONFIG_FILE_NAME
        if candidate.is_file():
            return candidate

    raise ConfigError(
        f"No {CONFIG_FILE_NAME} found in {here} or any parent folder. "
        f"Create one at the root of your repository, or pass --config PATH."
    )


def load_config(path: Path | None = None) -> Config:
    """Find (unless *path* is given), read and validate ``ephemwork.toml``."""
    config_path = path if path is not None else find_config()
    try:
        text = config_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{config_path}: file not found. Check the --config path.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{config_path}: cannot be read: {exc}.") from None

    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{config_path}: invalid TOML: {exc}.") from None

    return parse_config(document, config_path)


def parse_config(document: dict[str, Any], path: Path) -> Config:
    """Validate a decoded TOML *document* read from *path*."""
    try:
        return _parse(document, path.resolve())
    except _Invalid as exc:
        raise ConfigError(f"{path}: {exc}") from None


class _Invalid(Exception):
    """A problem in the document, described relative to the file."""


def _parse(document: dict[str, Any], path: Path) -> Config:
    _reject_unknown_keys(document, {"tunnel", "service"}, where="")

    tunnel_table = _table(document, "tunnel", default={"type": "local"})
    tunnel = _parse_tunnel(tunnel_table)

    services_table = _table(document, "service", default={})
    services: dict[str, ServiceConfig] = {}
    for name, table in services_table.items():
        services[name] = _parse_service(name, table)

    _reject_shared_ports(services)
    return Config(path=path, tunnel=tunnel, services=services)


def _parse_tunnel(table: dict[str, Any]) -> TunnelConfig:
    tunnel_type = table.get("type", "local")
    tunnel_class = TUNNEL_TYPES.get(tunnel_type) if isinstance(tunnel_type, str) else None
    if tunnel_class is None:
        choices = ", ".join(repr(name) for name in TUNNEL_TYPES)
        raise _Invalid(f"tunnel.type = {tunnel_type!r} is not a tunnel type; use one of {choices}.")

    _reject_unknown_keys(table, _field_names(tunnel_class), where="tunnel", context=tunnel_type)
    tunnel = _structure(table, tunnel_class, where="tunnel")

    for key in ("port", "control_port", "proxy_port"):
        if hasattr(tunnel, key):
            _check_port(getattr(tunnel, key), f"tunnel.{key}")

    return tunnel


def _parse_service(name: str, table: object) -> ServiceConfig:
    where = f"service.{name}"
    try:
        validate_name("service", name, source=f"[{where}]")
    except InvalidNameError as exc:
        raise _Invalid(str(exc)) from None

    if not isinstance(table, dict):
        raise _Invalid(f"{where} must be a table such as [{where}], got {table!r}.")

    allowed = _field_names(ServiceConfig) - {"name"}
    _reject_unknown_keys(table, allowed, where=where)
    if "port" not in table:
        raise _Invalid(f"{where}.port is missing; add `port = 8000` with your dev server's port.")

    table = {**table, "name": name}
    if "env_file" in table:
        table["env_file"] = _env_file_list(table["env_file"], f"{where}.env_file")
    service = _structure(table, ServiceConfig, where=where)
    _check_port(service.port, f"{where}.port")
    if service.health_check_path is not None and not service.health_check_path.startswith("/"):
        raise _Invalid(
            f"{where}.health_check_path = {service.health_check_path!r} must start with '/'."
        )
    for key in ("health_check_timeout", "stop_timeout"):
        if getattr(service, key) <= 0:
            raise _Invalid(f"{where}.{key} must be a positive number of seconds.")
    if service.restart not in RESTART_POLICIES:
        raise _Invalid(
            f'{where}.restart = {service.restart!r} is not valid; use "on-failure" or "never".'
        )

    return service


def _env_file_list(value: object, key: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise _Invalid(
            f'{key} must be a path or a list of paths, such as ".env" or [".env", '
            f'".env.local"], got {value!r}.'
        )
    return list(value)


def _reject_shared_ports(services: dict[str, ServiceConfig]) -> None:
    owners: dict[int, str] = {}
    for name, service in services.items():
        other = owners.setdefault(service.port, name)
        if other != name:
            raise _Invalid(
                f"service.{other}.port and service.{name}.port are both {service.port}; "
                "give each service its own port."
            )


def _table(document: dict[str, Any], key: str, *, default: dict[str, Any]) -> dict[str, Any]:
    value = document.get(key, default)
    if not isinstance(value, dict):
        raise _Invalid(f"{key} must be a table such as [{key}], got {value!r}.")
    return value


def _field_names(cls: type) -> set[str]:
    return {field.name for field in attrs.fields(cls)}


def _reject_unknown_keys(
    table: dict[str, Any], allowed: set[str], *, where: str, context: str = ""
) -> None:
    for key in table:
        if key not in allowed:
            full = f"{where}.{key}" if where else key
            scope = f" for tunnel type {context!r}" if context else ""
            valid = ", ".join(sorted(allowed))
            raise _Invalid(f"unknown key {full!r}{scope}; valid keys: {valid}.")


def _check_port(port: int, key: str) -> None:
    if not 1 <= port <= 65535:
        raise _Invalid(f"{key} = {port} is not a TCP port; use a number from 1 to 65535.")


class _WrongType(ValueError):
    def __init__(self, expected: str, value: object) -> None:
        super().__init__(f"must be {expected}, got {value!r}")


def _strict_int(value: object, _: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _WrongType("an integer", value)


def _strict_float(value: object, _: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise _WrongType("a number", value)


def _strict_str(value: object, _: object) -> str:
    if isinstance(value, str):
        return value
    raise _WrongType("a string", value)


def _strict_bool(value: object, _: object) -> bool:
    if isinstance(value, bool):
        return value
    raise _WrongType("true or false", value)


def _strict_str_table(value: object, _: object) -> dict[str, str]:
    if isinstance(value, dict) and all(isinstance(item, str) for item in value.values()):
        return dict(value)
    raise _WrongType('a table of strings such as { DEBUG = "1" }', value)


_converter = cattrs.Converter(forbid_extra_keys=True)
_converter.register_structure_hook(int, _strict_int)
_converter.register_structure_hook(float, _strict_float)
_converter.register_structure_hook(str, _strict_str)
_converter.register_structure_hook(bool, _strict_bool)
_converter.register_structure_hook_func(lambda cls: cls == dict[str, str], _strict_str_table)


def _structure(table: dict[str, Any], cls: type[T], *, where: str) -> T:
    try:
        return _converter.structure(table, cls)
    except cattrs.BaseValidationError as exc:
        problems = cattrs.transform_error(exc, path=where, format_exception=_format_problem)
        # transform_error renders each problem as "<message> @ <path>"; lead with the key.
        message, _, key = problems[0].rpartition(" @ ")
        raise _Invalid(f"{key} {message}.") from None


def _format_problem(exc: BaseException, _type: type | None) -> str:
    if isinstance(exc, KeyError):
        return "is missing; add it to the table"
    return str(exc)
