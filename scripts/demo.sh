#!/usr/bin/env bash
# Try ephemwork on this machine with no AWS account: local mode on examples/hello.
#
# Sets up .venv, then runs `ephemwork up hello` in examples/hello. That starts the example
# dev server on 127.0.0.1:8000, a bastion on 127.0.0.1:8080 and a real SSH reverse forward
# between them. Once the route is up, it sends one request with the route header and one
# without, and prints both answers. `up` keeps running until Ctrl-C; with --once the demo
# stops it right after the two requests.
#
# Environment:
#   EPHEMWORK_USER  user in the route header (default: demo)
#   PYTHON          interpreter for .venv (default: python3.11, then python3)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

# shellcheck source=scripts/venv.sh
source scripts/venv.sh

once=0
case "${1:-}" in
    "") ;;
    --once) once=1 ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "demo.sh: unknown argument ${1@Q}; the only option is --once." >&2
        exit 2
        ;;
esac

ensure_venv ""
export EPHEMWORK_USER="${EPHEMWORK_USER:-demo}"
route="$EPHEMWORK_USER:hello"

cd examples/hello
"$repo_root/$venv/bin/ephemwork" up hello &
up_pid=$!
trap 'kill -INT "$up_pid" 2>/dev/null || true; wait "$up_pid" || true' INT TERM

# show_request HEADER_VALUE PATH prints the status and body the bastion returns for a
# request to http://127.0.0.1:8080PATH, with X-Ephemwork: HEADER_VALUE unless it is empty.
show_request() {
    "$repo_root/$venv/bin/python" - "$1" "$2" <<'PY'
import sys
import urllib.error
import urllib.request

request = urllib.request.Request(f"http://127.0.0.1:8080{sys.argv[2]}")
if sys.argv[1]:
    request.add_header("X-Ephemwork", sys.argv[1])
try:
    with urllib.request.urlopen(request, timeout=10) as response:
        status, body = response.status, response.read()
except urllib.error.HTTPError as error:
    status, body = error.code, error.read()
print(f"HTTP {status}")
print(body.decode(errors="replace"))
PY
}

# Wait for the route: `up` builds nothing here, but the dev server and the bastion start.
for _ in $(seq 1 120); do
    if ! kill -0 "$up_pid" 2>/dev/null; then
        wait "$up_pid"
        exit $?
    fi
    if show_request "$route" /health 2>/dev/null | grep -q '^HTTP 200'; then
        break
    fi
    sleep 0.5
done

echo
echo "=== GET http://127.0.0.1:8080/orders?id=7 with X-Ephemwork: $route"
show_request "$route" "/orders?id=7"
echo "=== the same request without the header"
show_request "" "/orders?id=7"

if [[ "$once" -eq 1 ]]; then
    kill -INT "$up_pid"
fi
wait "$up_pid"
