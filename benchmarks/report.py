"""The benchmark's results and their Markdown report, with machine facts and targets.

`render` keeps whatever follows `KEEP_MARKER` in the previous report, so notes written by
hand under it survive a new run.
"""

from __future__ import annotations

import platform
import re
import statistics
import subprocess
from importlib import metadata
from pathlib import Path

import attrs
from load import WrkResult
from probes import ProfileSummary

KEEP_MARKER = "<!-- Everything below this line is written by hand; the harness keeps it. -->"

REFERENCE_UNTUNED = "nginx + ssh -N -R"
REFERENCE_TUNED = "nginx + ssh -tt -R"
EPHEMWORK = "ephemwork baseline"


@attrs.frozen
class NodelayRow:
    path: str
    process: str
    local: str
    remote: str
    nodelay: bool
    sockets: int


@attrs.define
class Results:
    rounds: int
    seconds: float
    # (path, load) -> one result per round
    runs: dict[tuple[str, str], list[WrkResult]] = attrs.field(factory=dict)
    # (path, load, round) -> result, for ratios within a round
    by_round: dict[tuple[str, str, int], WrkResult] = attrs.field(factory=dict)
    nodelay: list[NodelayRow] = attrs.field(factory=list)
    # path -> process -> percent of one CPU while wrk ran uvicorn c16
    cpu_shares: dict[str, dict[str, float]] = attrs.field(factory=dict)
    # path -> requests per second of that same wrk run
    cpu_rates: dict[str, float] = attrs.field(factory=dict)
    profiles: dict[str, ProfileSummary] = attrs.field(factory=dict)
    memory: dict[str, dict[str, float]] = attrs.field(factory=dict)
    zipapp: dict[str, float] = attrs.field(factory=dict)

    def add(self, path: str, load: str, round_index: int, result: WrkResult) -> None:
        self.runs.setdefault((path, load), []).append(result)
        self.by_round[(path, load, round_index)] = result

    def median(self, path: str, load: str, field: str) -> float | None:
        runs = self.runs.get((path, load))
        if not runs:
            return None
        values: list[float] = [getattr(run, field) for run in runs]
        return statistics.median(values)

    def ratio(self, path: str, reference: str, load: str, field: str) -> float | None:
        """Median over rounds of path / reference, each ratio from one round."""
        ratios = []
        for round_index in range(self.rounds):
            mine = self.by_round.get((path, load, round_index))
            theirs = self.by_round.get((reference, load, round_index))
            if mine is not None and theirs is not None and getattr(theirs, field) > 0:
                ratios.append(getattr(mine, field) / getattr(theirs, field))
        return statistics.median(ratios) if ratios else None


def render(results: Results, previous: Path) -> str:
    """Return the whole report; the hand-written part of *previous* is kept."""
    sections = [
        "# Benchmarks: ephemwork against nginx + OpenSSH\n",
        "Written by `benchmarks/run.sh` (see `benchmarks/README.md` for what it starts). "
        f"{results.rounds} round(s) of {results.seconds:g} s wrk runs, paths interleaved "
        "within each round; figures are medians over the rounds, ratios are medians of "
        "per-round ratios. All traffic is on 127.0.0.1, and every process (wrk, nginx, "
        "sshd, ssh, the bastion, `up`, the backends) shares the same CPUs.\n",
        _machine_facts(),
        _main_table(results),
        _ratio_table(results),
        _lever_table(results),
        _targets(results),
        _memory_table(results),
        _zipapp_table(results),
        _cpu_table(results),
        _nodelay_table(results),
        _profiles(results),
    ]
    text = "\n".join(section for section in sections if section)
    kept = ""
    if previous.exists():
        old = previous.read_text(encoding="utf-8")
        if KEEP_MARKER in old:
            kept = old.split(KEEP_MARKER, 1)[1]
    return f"{text}\n{KEEP_MARKER}{kept or chr(10)}"


def _machine_facts() -> str:
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    match = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
    if match:
        cpu = match.group(1).strip()
    aes = "yes" if re.search(r"^flags\s*:.*\baes\b", cpuinfo, re.MULTILINE) else "no"
    facts = {
        "CPUs (nproc)": _command(["nproc"]),
        "CPU model": cpu,
        "AES instructions": aes,
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "nginx": _command(["nginx", "-v"]).replace("nginx version: ", ""),
        "wrk": _command(["wrk", "-v"]).splitlines()[0] if _command(["wrk", "-v"]) else "",
        "OpenSSH": _command(["ssh", "-V"]),
        "git commit": _command(["git", "rev-parse", "--short", "HEAD"]),
    }
    for package in ("aiohttp", "asyncssh", "structlog", "uvloop", "uvicorn", "cryptography"):
        try:
            facts[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            facts[package] = "not installed"
    rows = "\n".join(f"| {name} | {value} |" for name, value in facts.items())
    return f"## Machine\n\n| fact | value |\n|---|---|\n{rows}\n"


def _command(argv: list[str]) -> str:
    try:
        completed = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "not found"
    return (completed.stdout + completed.stderr).strip()


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _paths(results: Results) -> list[str]:
    return list(dict.fromkeys(path for path, _load in results.runs))


def _loads(results: Results) -> list[str]:
    return list(dict.fromkeys(load for _path, load in results.runs))


def _main_table(results: Results) -> str:
    lines = [
        "## Requests per second and latency\n",
        "`bulk` is one connection downloading the 10 MiB body over and over; MiB/s is wrk's "
        "Transfer/sec. `errors` counts non-2xx responses and socket errors over all rounds.\n",
        "| path | load | req/s | p50 ms | p99 ms | MiB/s | errors |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for path in (REFERENCE_UNTUNED, REFERENCE_TUNED, EPHEMWORK):
        for load in _loads(results):
            if (path, load) not in results.runs:
                continue
            errors = sum(run.errors for run in results.runs[(path, load)])
            lines.append(
                f"| {path} | {load} | {_fmt(results.median(path, load, 'requests_per_second'))} "
                f"| {_fmt(results.median(path, load, 'p50_ms'), 2)} "
                f"| {_fmt(results.median(path, load, 'p99_ms'), 2)} "
                f"| {_fmt(results.median(path, load, 'mib_per_second'), 1)} | {errors} |"
            )
    return "\n".join(lines) + "\n"


def _ratio_table(results: Results) -> str:
    lines = [
        "## Ratios ephemwork / reference (same round)\n",
        "| load | req/s vs ssh -N | req/s vs ssh -tt | MiB/s vs ssh -N | MiB/s vs ssh -tt |",
        "|---|--:|--:|--:|--:|",
    ]
    for load in _loads(results):
        cells = [
            _fmt(results.ratio(EPHEMWORK, reference, load, field), 2)
            for field in ("requests_per_second", "mib_per_second")
            for reference in (REFERENCE_UNTUNED, REFERENCE_TUNED)
        ]
        lines.append(f"| {load} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _lever_table(results: Results) -> str:
    variants = [path for path in _paths(results) if path.startswith("ephemwork ")]
    loads = [
        load
        for load in _loads(results)
        if all((variant, load) in results.runs for variant in variants)
    ]
    header = " | ".join(f"{load} req/s | {load} p99 ms" for load in loads if "bulk" not in load)
    lines = [
        "## Levers, each measured alone on the ephemwork path\n",
        "Set by `benchmarks/launch.py` without changing `src/`: `quiet` (`--log-level warning`: no "
        "per-request log line), `nopty` (no idle pty, so sshd leaves Nagle on), `nopool` "
        "(no keep-alive to the tunnel port), `asyncio` (asyncio's event loop instead of uvloop), "
        "and `before` (`src/` of the revision given to "
        "`--compare`, unchanged). Percentages are the median per-round change against "
        "`baseline`.\n",
        f"| variant | {header} | bulk MiB/s |",
        "|---|" + "--:|" * (2 * len([x for x in loads if "bulk" not in x]) + 1),
    ]
    for variant in variants:
        cells = []
        for load in loads:
            if "bulk" in load:
                continue
            rate = results.median(variant, load, "requests_per_second")
            change = results.ratio(variant, EPHEMWORK, load, "requests_per_second")
            cells.append(f"{_fmt(rate)} ({_change(change)})")
            cells.append(_fmt(results.median(variant, load, "p99_ms"), 2))
        bulk_load = next((load for load in loads if "bulk" in load), None)
        if bulk_load is not None:
            bulk = results.median(variant, bulk_load, "mib_per_second")
            change = results.ratio(variant, EPHEMWORK, bulk_load, "mib_per_second")
            cells.append(f"{_fmt(bulk, 1)} ({_change(change)})")
        lines.append(f"| {variant.removeprefix('ephemwork ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _change(ratio: float | None) -> str:
    return "-" if ratio is None else f"{(ratio - 1) * 100:+.0f} %"


def _targets(results: Results) -> str:
    rows = []

    def check(name: str, value: float | None, limit: float, *, at_most: bool, unit: str) -> None:
        if value is None:
            rows.append(f"| {name} | - | {limit:g}{unit} | not measured |")
            return
        met = value <= limit if at_most else value >= limit
        bound = "≤" if at_most else "≥"
        verdict = "met" if met else "MISSED"
        rows.append(f"| {name} | {value:,.2f}{unit} | {bound} {limit:g}{unit} | {verdict} |")

    for variant in (EPHEMWORK, "ephemwork quiet"):
        label = variant.removeprefix("ephemwork ")
        for load in ("uvicorn c16", "fast c16"):
            check(
                f"{label}: p99 {load}",
                results.median(variant, load, "p99_ms"),
                5,
                at_most=True,
                unit=" ms",
            )
        check(
            f"{label}: uvicorn c16 req/s vs ssh -tt",
            results.ratio(variant, REFERENCE_TUNED, "uvicorn c16", "requests_per_second"),
            0.5,
            at_most=False,
            unit="x",
        )
        check(
            f"{label}: uvicorn c16 req/s vs ssh -N",
            results.ratio(variant, REFERENCE_UNTUNED, "uvicorn c16", "requests_per_second"),
            1.0,
            at_most=False,
            unit="x",
        )
        check(
            f"{label}: bulk MiB/s vs ssh -tt",
            results.ratio(variant, REFERENCE_TUNED, "bulk 10 MiB", "mib_per_second"),
            0.7,
            at_most=False,
            unit="x",
        )
    for variant, figures in results.memory.items():
        check(f"{variant}: RSS idle", figures.get("idle"), 60, at_most=True, unit=" MiB")
        loaded = next((v for k, v in figures.items() if "connections" in k), None)
        check(
            f"{variant}: RSS 100 sessions + 1,000 connections",
            loaded,
            120,
            at_most=True,
            unit=" MiB",
        )
    check("ephemwork.pyz --help wall", results.zipapp.get("--help"), 0.3, at_most=True, unit=" s")
    check("ephemwork.pyz status wall", results.zipapp.get("status"), 0.6, at_most=True, unit=" s")
    return (
        "## Targets\n\n| target | measured | bound | result |\n|---|--:|--:|---|\n"
        + "\n".join(rows)
        + "\n"
    )


def _memory_table(results: Results) -> str:
    if not results.memory:
        return ""
    lines = ["## Bastion resident memory (MiB)\n", "| variant | state | RSS |", "|---|---|--:|"]
    for variant, figures in results.memory.items():
        for state, value in figures.items():
            lines.append(f"| {variant} | {state} | {value:.1f} |")
    return "\n".join(lines) + "\n"


def _zipapp_table(results: Results) -> str:
    if not results.zipapp:
        return ""
    lines = [
        "## Zipapp start-up (median of 5 warm runs; imports from `python -X importtime`)\n",
        "| measure | seconds |",
        "|---|--:|",
    ]
    for name, value in results.zipapp.items():
        lines.append(f"| {name} | {value:.3f} |")
    return "\n".join(lines) + "\n"


def _cpu_table(results: Results) -> str:
    if not results.cpu_shares:
        return ""
    roles = list(dict.fromkeys(role for shares in results.cpu_shares.values() for role in shares))
    cpus = int(_command(["nproc"]))
    lines = [
        "## CPU use per process (uvicorn c16, 3 s, percent of one CPU)\n",
        "From utime + stime in /proc, children included (nginx workers, sshd's "
        "per-connection processes). wrk itself is not counted. The machine has "
        f"{cpus} CPUs, so the sum cannot exceed {100 * cpus} %.\n",
        "| path | " + " | ".join(roles) + " |",
        "|---|" + "--:|" * len(roles),
    ]
    for path, shares in results.cpu_shares.items():
        cells = [_fmt(shares.get(role)) for role in roles]
        lines.append(f"| {path} | " + " | ".join(cells) + " |")
    if not results.cpu_rates:
        return "\n".join(lines) + "\n"

    lines += [
        "\nThe same run as CPU time per request, an estimate: the share of one CPU divided "
        "by the run's requests per second. The share is taken over a window slightly longer "
        "than wrk's 3 s, so the figures are a few percent low.\n",
        "| path | req/s | " + " | ".join(f"{role} µs" for role in roles) + " | sum µs |",
        "|---|--:|" + "--:|" * (len(roles) + 1),
    ]
    for path, shares in results.cpu_shares.items():
        rate = results.cpu_rates.get(path)
        if not rate:
            continue
        per_request = {role: 1e4 * share / rate for role, share in shares.items()}
        cells = [_fmt(per_request.get(role)) for role in roles]
        cells.append(_fmt(sum(per_request.values())))
        lines.append(f"| {path} | {rate:,.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _nodelay_table(results: Results) -> str:
    if not results.nodelay:
        return ""
    lines = [
        "## TCP_NODELAY on the live sockets\n",
        "Read with `getsockopt` on each socket, copied out of the running process with "
        "`pidfd_getfd(2)` while wrk held 16 connections; `sshd` includes its per-connection "
        "children.\n",
        "| path | process | local end | remote end | TCP_NODELAY | sockets |",
        "|---|---|---|---|---|--:|",
    ]
    for row in results.nodelay:
        lines.append(
            f"| {row.path} | {row.process} | {row.local} | {row.remote} | "
            f"{'on' if row.nodelay else 'OFF'} | {row.sockets} |"
        )
    return "\n".join(lines) + "\n"


def _profiles(results: Results) -> str:
    if not results.profiles:
        return ""
    parts = [
        "## Where the time goes (py-spy, uvicorn c16)\n",
        "Share of samples at 250 Hz; py-spy drops samples of threads it sees idle, but the "
        "event loop's poll (`select`, or `Runner.run` under uvloop) still shows. *self* is the "
        "innermost frame, "
        "*total* counts a frame anywhere on the stack.\n",
    ]
    for name, summary in results.profiles.items():
        parts.append(f"### {name}: {summary.samples} samples\n")
        parts.append("| self % | frame | | total % | frame |\n|--:|---|---|--:|---|")
        for (self_name, self_share), (total_name, total_share) in zip(
            summary.self_top, summary.total_top, strict=False
        ):
            parts.append(
                f"| {self_share:.1f} | `{self_name}` | | {total_share:.1f} | `{total_name}` |"
            )
        parts.append("")
    return "\n".join(parts) + "\n"
