# Shared set-up for scripts/test.sh and scripts/demo.sh; source it, do not run it.
#
# ensure_venv EXTRAS creates .venv with Python 3.11 or newer (PYTHON overrides the choice)
# and installs the project editable with the given extras ("" or "test"). A second call
# reuses .venv and skips pip while pyproject.toml and the extras are unchanged.

venv=".venv"

log() {
    echo "$(basename "$0"): $*"
}

as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then
        "$@"
    else
        sudo "$@"
    fi
}

apt_install() {
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"
}

# Python 3.11 first: the bastion runs it (Amazon Linux 2023), and dist/ephemwork.pyz carries
# compiled wheels for one Python version.
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

ensure_venv() {
    local extras="$1" python venv_package wanted_stamp spec
    local install_stamp="$venv/.ephemwork-install-stamp"

    if ! python="$(find_python)"; then
        echo "$(basename "$0"): no Python 3.11 or newer found on PATH (tried python3.11," \
            "python3, python3.12, python3.13); install python3.11 or set" \
            "PYTHON=/path/to/python3.11." >&2
        exit 1
    fi

    # A venv made by an older Python is replaced rather than reused.
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
            apt_install "$venv_package"
            "$python" -m venv "$venv"
        fi
    fi

    # The install is editable, so only a change to pyproject.toml (dependencies, entry
    # points) or to the extras needs a new one.
    spec="."
    [[ -z "$extras" ]] || spec=".[$extras]"
    wanted_stamp="$(sha256sum pyproject.toml | cut -d' ' -f1) $spec"
    if [[ "$(cat "$install_stamp" 2>/dev/null || true)" != "$wanted_stamp" ]]; then
        log "installing the project into $venv ($spec)"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$spec"
        echo "$wanted_stamp" >"$install_stamp"
    fi
}
