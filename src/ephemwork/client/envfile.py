"""Environment files (``KEY=VALUE`` lines) for a service's dev server.

The syntax is the common subset of dotenv and Docker Compose env files: blank lines and
lines starting with ``#`` are ignored, an optional ``export`` prefix is allowed, and a value
may be wrapped in single or double quotes, which are removed. No variable expansion is done.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from ephemwork.errors import ConfigError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_env_file(path: Path, *, setting: str) -> dict[str, str]:
    """Return the variables of the env file at *path*.

    *setting* names the configuration key for the fix, such as ``service.api.env_file``.
    Raises `ConfigError` naming the file, and the line number for a malformed line.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"The env file {str(path)!r} does not exist. Create it, or fix {setting} in "
            "ephemwork.toml (relative paths start at the folder of ephemwork.toml)."
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Cannot read the env file {str(path)!r}: {exc}. Fix {setting}.") from exc

    variables: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, value = _parse_line(line, path, number, raw)
        variables[name] = value
    return variables


def _parse_line(line: str, path: Path, number: int, raw: str) -> tuple[str, str]:
    where = f"{path}, line {number}"
    if line.startswith("export "):
        line = line.removeprefix("export ").lstrip()

    name, equals, value = line.partition("=")
    name = name.strip()
    if not equals:
        raise ConfigError(f"{where}: expected KEY=VALUE, got {raw!r}. Fix or remove the line.")
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"{where}: {name!r} is not a valid variable name (letters, digits and '_', not "
            "starting with a digit). Fix or remove the line."
        )

    value = value.strip()
    if value[:1] in ("'", '"'):
        quote = value[0]
        if len(value) < 2 or not value.endswith(quote):
            raise ConfigError(
                f"{where}: the value of {name} opens a {quote} quote that is not closed on the "
                "same line. Close the quote, or remove it."
            )
        value = value[1:-1]
    return name, value


def build_environment(
    root: Path,
    env_files: Sequence[str],
    literals: Mapping[str, str],
    *,
    service: str,
    inherited: Mapping[str, str] | None = None,
    defaults: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Merge the inherited environment, *defaults*, each env file in order, then ``env``.

    *defaults* are values ephemwork provides, such as ``PORT``; they replace inherited
    values, and the service's env files and ``env`` table replace them.
    """
    environment = dict(os.environ if inherited is None else inherited)
    environment.update(defaults or {})
    for name in env_files:
        path = root / Path(name).expanduser()
        environment.update(parse_env_file(path, setting=f"service.{service}.env_file"))
    environment.update(literals)
    return environment
