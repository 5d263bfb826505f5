"""``scripts/build_pyz.sh --target linux-aarch64``: arm64 compiled modules, reproducible.

Running the result under an aarch64 Python is not tested here: that needs qemu-user-static
and an arm64 Python root, which this machine does not have.
"""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from helpers.repo import BUILD_PYZ_SCRIPT, REPO_ROOT


def _build(output: Path) -> Path:
    result = subprocess.run(
        [str(BUILD_PYZ_SCRIPT), "--target", "linux-aarch64", str(output)],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return output


@pytest.fixture(scope="module")
def aarch64_pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The aarch64 zipapp, built once for this module."""
    return _build(tmp_path_factory.mktemp("pyz") / "ephemwork-aarch64.pyz")


class TestAarch64Pyz:
    def test_only_aarch64_modules(self, aarch64_pyz: Path, tmp_path: Path) -> None:
        """`file` reports every compiled module in the zipapp as ARM aarch64."""
        if shutil.which("file") is None:
            pytest.skip("the file command is not installed")
        with zipfile.ZipFile(aarch64_pyz) as archive:
            names = [name for name in archive.namelist() if ".so" in Path(name).suffixes]
            archive.extractall(tmp_path, members=names)

        assert names, "the zipapp holds no compiled module"
        for name in names:
            kind = subprocess.run(
                ["file", "-b", str(tmp_path / name)], capture_output=True, text=True, check=True
            ).stdout
            assert "aarch64" in kind, f"{name}: {kind}"

    def test_byte_identical_rebuild(self, aarch64_pyz: Path, tmp_path: Path) -> None:
        """A second build from the same checkout gives the same bytes."""
        again = _build(tmp_path / "again.pyz")
        assert again.read_bytes() == aarch64_pyz.read_bytes()

    def test_rejects_unknown_target(self) -> None:
        """An unknown --target is a usage error."""
        result = subprocess.run(
            [str(BUILD_PYZ_SCRIPT), "--target", "windows-arm", "/dev/null"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 2
