"""Paths inside this checkout that tests run or read, and the rule for missing tools."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_PYZ_SCRIPT = REPO_ROOT / "scripts" / "build_pyz.sh"
PYZ_PATH = REPO_ROOT / "dist" / "ephemwork.pyz"


def skip_or_fail(reason: str) -> None:
    """Skip the test for a missing tool, or fail it under CI, where scripts/test.sh installs it.

    CI sets ``CI=true``; a skip there would hide a broken install step.
    """
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (a skip is not allowed under CI)")
    pytest.skip(reason)
