#!/usr/bin/env bash
# Benchmark ephemwork against nginx + OpenSSH on this machine (127.0.0.1 only).
#
# Installs what is missing: nginx, wrk and openssh-server with apt-get (as root or through
# sudo), and a venv in build/bench-venv with this checkout, uvicorn, uvloop, httptools and
# py-spy. Then runs benchmarks/harness.py, which prints the tables and writes
# docs/benchmarks.md. Every process it starts is stopped before it exits.
#
# Usage: benchmarks/run.sh [--quick] [--rounds N] [--seconds S] [--output FILE]
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
venv="build/bench-venv"

as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

missing=()
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || missing+=(nginx-light)
command -v wrk >/dev/null || missing+=(wrk)
[[ -x /usr/sbin/sshd ]] || missing+=(openssh-server)
command -v ssh >/dev/null || missing+=(openssh-client)
if ((${#missing[@]})); then
    echo "run.sh: installing ${missing[*]}"
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [[ ! -x "$venv/bin/py-spy" ]]; then
    echo "run.sh: creating $venv"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet -e . uvicorn uvloop httptools py-spy
fi

export PATH="/usr/sbin:$PATH"
# 1,000 open connections through the proxy need about 3,000 descriptors across the processes.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec "$venv/bin/python" benchmarks/harness.py "$@"
