#!/usr/bin/env bash
# Set up a fresh Debian machine for the tests and run ruff, mypy and pytest.
#
# Installs OpenSSH (the tests start a real sshd) when it is missing, creates .venv with
# Python 3.11 or newer, installs the project with its test extras, then runs the checks.
# Arguments are passed on to pytest, e.g. `scripts/test.sh -k zipapp -x`.
# A second run reuses .venv and skips `pip install` while pyproject.toml is unchanged.
#
# Environment:
#   PYTHON  interpreter for .venv (default: the first python3.x >= 3.11 on PATH)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

venv=".venv"
install_stamp="$venv/.ephemwork-install-stamp"

log() {
    echo "test.sh: $*"
}

as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then
        "$@"
    else
        sudo "$@"
    fi
}

find_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3.11 python3 python3.12 python3.13; do
        if [[ -n "$candidate" ]] && command -v "$candidate" >/dev/null 2>&1 \
            && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

if ! python="$(find_python)"; then
    echo "test.sh: no Python 3.11 or newer found on PATH (tried python3.11, python3," \
        "python3.12, python3.13); install python3.11 or set PYTHON=/path/to/python3.11." >&2
    exit 1
fi

# Step 1: Debian packages. The sshd fixture needs the OpenSSH server and ssh-keygen.
packages=()
if [[ ! -x /usr/sbin/sshd ]] || ! command -v ssh-keygen >/dev/null 2>&1; then
    packages+=(openssh-server openssh-client)
fi
if [[ ${#packages[@]} -gt 0 ]]; then
    log "installing Debian packages: ${packages[*]}"
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "${packages[@]}"
fi

# Step 2: the venv. One made by an older Python is replaced rather than reused.
if [[ -x "$venv/bin/python" ]] \
    && ! "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    log "replacing $venv: its Python is older than 3.11"
    rm -rf "$venv"
fi
if [[ ! -x "$venv/bin/python" ]]; then
    log "creating $venv with $python ($("$python" --version 2>&1))"
    if ! "$python" -m venv "$venv"; then
        # Debian ships venv's pip bootstrap in a separate package, python3.X-venv.
        venv_package="python$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"
        log "python -m venv failed; installing $venv_package and retrying"
        rm -rf "$venv"
        as_root apt-get update
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "$venv_package"
        "$python" -m venv "$venv"
    fi
fi

# Step 3: the project and its test tools. The install is editable, so only a change to
# pyproject.toml (dependencies, entry points) needs a new one.
wanted_stamp="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ "$(cat "$install_stamp" 2>/dev/null || true)" != "$wanted_stamp" ]]; then
    log "installing the project into $venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[test]'
    echo "$wanted_stamp" >"$install_stamp"
fi

# Step 4: the checks. `set -e` stops at the first one that fails and returns its exit code.
log "ruff check"
"$venv/bin/ruff" check

log "mypy"
"$venv/bin/mypy"

log "pytest $*"
"$venv/bin/pytest" "$@"
