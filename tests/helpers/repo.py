"""Paths inside this checkout that tests run or read."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_PYZ_SCRIPT = REPO_ROOT / "scripts" / "build_pyz.sh"
PYZ_PATH = REPO_ROOT / "dist" / "ephemwork.pyz"
