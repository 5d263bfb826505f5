#!/usr/bin/env bash
# Build dist/ephemwork.pyz, a shiv zipapp that needs nothing installed but CPython 3.11.
#
# The dependencies come from the exact pins in zipapp/requirements.txt; the project itself is
# installed from this checkout without dependencies. Two builds of the same checkout are
# byte-identical: file times are fixed (SOURCE_DATE_EPOCH), paths and modes are the same, and
# nothing that records the checkout's location goes into the archive.
#
# NOTE: compiled wheels are taken for CPython 3.11 on the build machine's OS and CPU. On
# Python 3.12+ `--help` still runs, but commands that import asyncssh fail (cffi's extension
# is built per Python version), and a pyz built on x86_64 does not run on an arm64 host.
#
# Usage: scripts/build_pyz.sh [--target linux-aarch64|linux-x86_64] [OUTPUT]
#        (default OUTPUT: dist/ephemwork.pyz). With --target, compiled wheels are those of that
#        Linux CPU (manylinux, glibc 2.17 to 2.34, the range Amazon Linux 2023 runs), so an
#        x86_64 laptop builds the arm64 bastion's zipapp.
# Environment:
#   PYTHON             interpreter for the build venv (default: the first python3.x >= 3.11 on PATH)
#   SOURCE_DATE_EPOCH  timestamp written into the archive (default: time of the last git commit)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

target=""
if [[ "${1:-}" == "--target" ]]; then
    target="${2:-}"
    shift 2 || true
fi
platform_args=()
case "$target" in
    "") ;;
    linux-aarch64|linux-x86_64)
        arch="${target#linux-}"
        for tag in manylinux2014 manylinux_2_28 manylinux_2_34; do
            platform_args+=(--platform "${tag}_${arch}")
        done
        platform_args+=(--implementation cp)
        ;;
    *)
        echo "build_pyz.sh: --target ${target@Q} is not linux-aarch64 or linux-x86_64." >&2
        exit 2
        ;;
esac

output="${1:-dist/ephemwork.pyz}"
build_dir="build/pyz"
build_venv="$build_dir/venv"
staging="$build_dir/site-packages${target:+-$target}"
requirements="zipapp/requirements.txt"

# Compiled wheels in the zipapp are chosen for this CPython version, whatever runs the build.
target_python_version="3.11"
shiv_requirement="shiv==1.0.8"

# File modes go into the archive, so they must not depend on the caller's umask.
umask 022

find_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
        if [[ -n "$candidate" ]] && command -v "$candidate" >/dev/null 2>&1 \
            && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

# Two builds at once (two test runs, say) would empty each other's staging folder and pack an
# archive without dependencies, so each build holds this lock from start to end.
mkdir -p "$build_dir"
exec {lock_fd}>"$build_dir/lock"
flock "$lock_fd"
started_at=$SECONDS

# Step 1: a build venv with shiv, kept between builds.
if [[ ! -x "$build_venv/bin/shiv" ]]; then
    if ! python="$(find_python)"; then
        echo "build_pyz.sh: no Python 3.11 or newer found on PATH; install python3.11 or set PYTHON." >&2
        exit 1
    fi
    echo "build_pyz.sh: creating build venv $build_venv with $python"
    rm -rf "$build_venv"
    "$python" -m venv "$build_venv"
    "$build_venv/bin/python" -m pip install --quiet "$shiv_requirement"
fi
pip=("$build_venv/bin/python" -m pip --disable-pip-version-check)

# Step 2: install the pinned dependencies into a fresh staging folder. Bytecode is left out
# because .pyc headers carry source file times; Python compiles it after extraction.
rm -rf "$staging"
mkdir -p "$staging"
"${pip[@]}" install --quiet --no-compile --target "$staging" \
    --python-version "$target_python_version" --only-binary=:all: "${platform_args[@]}" \
    --requirement "$requirements"
# Without this, the project's install in step 3 warns that bin/ exists; see step 3's cleanup.
rm -rf "${staging:?}/bin"

# pip resolved dependencies for the install above, so a package it added beyond the pins
# means requirements.txt is incomplete and the build would not be reproducible.
normalize_names() {
    grep -Eo '^[A-Za-z0-9._-]+==[^ ;#]+' \
        | awk -F'==' '{ name = tolower($1); gsub(/[._]/, "-", name); print name "==" $2 }' \
        | sort
}
pinned="$(normalize_names <"$requirements")"
installed="$("${pip[@]}" freeze --path "$staging" | normalize_names)"
if [[ "$pinned" != "$installed" ]]; then
    echo "build_pyz.sh: pip installed other packages than $requirements pins" \
        "(< pinned, > installed):" >&2
    diff <(echo "$pinned") <(echo "$installed") >&2 || true
    echo "Regenerate it with the pip-compile command in zipapp/requirements.in." >&2
    exit 1
fi

# Step 3: the project itself. setuptools reuses build/lib between builds, and a module deleted
# from src/ would survive there and end up in the wheel, so start from an empty one.
rm -rf build/lib build/bdist.*
"${pip[@]}" install --quiet --no-compile --no-deps --target "$staging" .

# Console scripts carry the build venv's path in their shebang, and direct_url.json records
# the checkout's path. The zipapp uses neither, so both go, with their lines in RECORD.
rm -rf "${staging:?}/bin"
rm -f "$staging"/ephemwork-*.dist-info/direct_url.json
sed -i -E '/^(\.\.\/)*bin\//d; /direct_url\.json,/d' "$staging"/*.dist-info/RECORD

# Step 4: pack. shiv writes every entry with the SOURCE_DATE_EPOCH time.
if [[ -z "${SOURCE_DATE_EPOCH:-}" ]]; then
    SOURCE_DATE_EPOCH="$(git log -1 --format=%ct 2>/dev/null || echo 315532800)"
fi
export SOURCE_DATE_EPOCH

mkdir -p "$(dirname "$output")"
"$build_venv/bin/shiv" \
    --site-packages "$staging" \
    --entry-point ephemwork.pyz:main \
    --python '/usr/bin/env python3' \
    --compressed \
    --reproducible \
    --output-file "$output"

size_bytes="$(stat -c %s "$output")"
echo "build_pyz.sh: wrote $output ($((size_bytes / 1024)) KiB, $size_bytes bytes) in $((SECONDS - started_at)) s"
