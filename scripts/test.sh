#!/usr/bin/env bash
# Set up a fresh Debian machine for the tests and run ruff, mypy and pytest.
#
# Installs OpenSSH (the tests start a real sshd) and Chromium (the browser test) when
# missing, creates .venv with Python 3.11 or newer, installs the project with its test
# extras, then runs the checks.
# Arguments are passed on to pytest, e.g. `scripts/test.sh -k zipapp -x`.
# A second run reuses .venv and skips `pip install` while pyproject.toml is unchanged.
#
# Environment:
#   PYTHON  interpreter for .venv (default: the first python3.x >= 3.11 on PATH)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

# shellcheck source=scripts/venv.sh
source scripts/venv.sh

# Step 1: Debian packages. The sshd fixture needs the OpenSSH server and ssh-keygen;
# tests/test_browser.py drives headless Chromium.
packages=()
if [[ ! -x /usr/sbin/sshd ]] || ! command -v ssh-keygen >/dev/null 2>&1; then
    packages+=(openssh-server openssh-client)
fi
if ! command -v chromium >/dev/null 2>&1; then
    packages+=(chromium)
fi
if [[ ${#packages[@]} -gt 0 ]]; then
    log "installing Debian packages: ${packages[*]}"
    apt_install "${packages[@]}"
fi

# Step 2: .venv with the project and its test tools.
ensure_venv test

# Step 3: the checks. `set -e` stops at the first one that fails and returns its exit code.
log "ruff check"
"$venv/bin/ruff" check

log "mypy"
"$venv/bin/mypy"

log "pytest $*"
"$venv/bin/pytest" "$@"
