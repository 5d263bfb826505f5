"""The entry point of ``ephemwork.pyz``: check the interpreter before any native module loads.

The zipapp carries compiled modules (orjson, httptools, uvloop, cryptography) built for one
CPython version. On another version the first import of one of them would fail with a
traceback. This module imports nothing but ``sys`` and prints what to run instead.
"""

from __future__ import annotations

import sys

# The CPython version whose wheels scripts/build_pyz.sh packs.
BUILT_FOR = (3, 11)


def main() -> None:
    """Run the ephemwork CLI, or exit with code 2 on a Python the zipapp was not built for."""
    if sys.version_info[:2] != BUILT_FOR:
        version = ".".join(str(part) for part in sys.version_info[:3])
        expected = ".".join(str(part) for part in BUILT_FOR)
        sys.stderr.write(
            f"error: ephemwork.pyz was built for CPython {expected}, but this is Python "
            f"{version}. Run it with python{expected}, or install ephemwork with pip for this "
            "Python.\n"
        )
        sys.exit(2)

    from ephemwork.cli import main as cli_main

    cli_main()
