"""The per-user folder for local state: ``~/.ephemwork`` unless ``EPHEMWORK_HOME`` is set."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV_VAR = "EPHEMWORK_HOME"


def ephemwork_home() -> Path:
    """Return the ephemwork folder of this user, without creating it."""
    override = os.environ.get(HOME_ENV_VAR)
    if override:
        return Path(override).expanduser()
    return Path.home() / ".ephemwork"
