"""The developer's user name and the rule for names that go into a route header."""

from __future__ import annotations

import os
import re
import subprocess

from ephemwork.errors import InvalidNameError

# Lower-case letters, digits, dot, underscore and hyphen, starting with a letter or digit:
# safe in a header value, a cookie, a file name and a log line without quoting.
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
NAME_RULE = "1 to 63 characters from a-z, 0-9, '.', '_' and '-', starting with a letter or digit"

USER_ENV_VAR = "EPHEMWORK_USER"


def is_valid_name(value: str) -> bool:
    """Return whether *value* is a valid user or service name."""
    return NAME_PATTERN.fullmatch(value) is not None


def validate_name(kind: str, value: str, *, source: str = "") -> str:
    """Return *value* if it is a valid *kind* name, or raise `InvalidNameError`.

    *source* says where the value came from (an environment variable, a config key) so the
    message can point at what to change.
    """
    if is_valid_name(value):
        return value

    where = f" (from {source})" if source else ""
    raise InvalidNameError(f"Invalid {kind} name {value!r}{where}: use {NAME_RULE}.")


def resolve_user() -> str:
    """Return the user for the route header: ``EPHEMWORK_USER`` or the git e-mail's local part."""
    override = os.environ.get(USER_ENV_VAR)
    if override is not None:
        return validate_name("user", override, source=USER_ENV_VAR)

    email = _read_git_email()
    if not email:
        raise InvalidNameError(
            "Cannot determine your user name: `git config user.email` is not set. "
            f"Set it, or set {USER_ENV_VAR}."
        )

    local_part = email.partition("@")[0].lower()
    return validate_name("user", local_part, source=f"git config user.email {email!r}")


def _read_git_email() -> str:
    try:
        completed = subprocess.run(
            ["git", "config", "user.email"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return completed.stdout.strip()
