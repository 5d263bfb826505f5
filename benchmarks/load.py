"""Load runs with wrk and the parsing of its report.

wrk prints latency percentiles with ``--latency`` and bytes per second as "Transfer/sec" in
binary units (1 MB = 1024 * 1024 bytes), which this module keeps: bulk figures are MiB/s.
"""

from __future__ import annotations

import re
import subprocess

import attrs

_UNITS_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}
_UNITS_BYTES = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


@attrs.frozen
class WrkResult:
    """One wrk run."""

    requests_per_second: float
    p50_ms: float
    p99_ms: float
    mib_per_second: float
    # Non-2xx responses plus socket errors of any kind.
    errors: int


def run_wrk(
    url: str,
    route: str,
    *,
    connections: int,
    seconds: float,
    threads: int = 2,
) -> WrkResult:
    """Run wrk against *url* with ``X-Ephemwork: route`` and return its figures."""
    argv = [
        "wrk",
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--timeout",
        "10s",
        "--latency",
        "-H",
        f"X-Ephemwork: {route}",
        url,
    ]
    completed = subprocess.run(
        argv, capture_output=True, text=True, timeout=seconds + 30, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"wrk failed ({completed.returncode}): {completed.stderr}")
    return parse_wrk(completed.stdout)


def parse_wrk(output: str) -> WrkResult:
    """Parse the report of ``wrk --latency``."""
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)([KMG]?B)", output)
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.MULTILINE)
    if rate is None or transfer is None or p50 is None or p99 is None:
        raise ValueError(f"cannot parse the wrk report:\n{output}")

    errors = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket_errors:
        errors += sum(int(group) for group in socket_errors.groups())

    return WrkResult(
        requests_per_second=float(rate.group(1)),
        p50_ms=float(p50.group(1)) * _UNITS_SECONDS[p50.group(2)] * 1000,
        p99_ms=float(p99.group(1)) * _UNITS_SECONDS[p99.group(2)] * 1000,
        mib_per_second=float(transfer.group(1)) * _UNITS_BYTES[transfer.group(2)] / 1024**2,
        errors=errors,
    )
