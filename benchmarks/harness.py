"""Benchmark ephemwork against nginx + OpenSSH on this machine, over loopback only.

Run it through ``benchmarks/run.sh``, which installs the tools first. Each round runs every
load against every path, so ratios compare runs made under the same conditions. The report
gives medians over the rounds.
"""

from __future__ import annotations

import argparse
import atexit
import concurrent.futures
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import attrs
import memory
import probes
import report
import stack as stack_module
from load import WrkResult, run_wrk
from processes import Processes
from stack import (
    BENCH_DIR,
    REPO_ROOT,
    Backends,
    Reference,
    SshdServer,
    start_backends,
    start_bench_sshd,
    start_ephemwork,
    start_reference,
)

# Lever sets for the ephemwork path; "baseline" is the code as it is in src/.
VARIANTS = {
    "baseline": "",
    "nopty": "nopty",
    "nopool": "nopool",
    "quiet": "quiet",
    "asyncio": "asyncio",
}
# Not measured: `aesgcm` and `window`, which src/ does.

# The variant measured for memory and profiles besides baseline.
SECOND_VARIANT = "quiet"


@attrs.frozen
class Load:
    name: str
    backend: str
    path: str
    connections: int
    # Levers are measured on the loads marked here, to keep a full run near 15 minutes.
    for_levers: bool


LOADS = (
    Load("uvicorn c16", "uvicorn", "/json", 16, True),
    Load("uvicorn c64", "uvicorn", "/json", 64, False),
    Load("fast c16", "fast", "/", 16, True),
    Load("fast c64", "fast", "/", 64, False),
    Load("bulk 10 MiB", "uvicorn", "/bulk", 1, True),
)


# The recorded figures, which a full run rewrites above its hand-written part.
DOCS_REPORT = REPO_ROOT / "docs" / "benchmarks.md"


def main() -> None:
    """Parse the options, run the benchmark and write the report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one round of 2 s runs")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds per wrk run")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="Markdown report to write (default docs/benchmarks.md, or benchmarks.md in the "
        "run's work folder for --quick, so a quick run leaves the recorded figures alone)",
    )
    parser.add_argument(
        "--source",
        metavar="REVISION",
        help="benchmark src/ as of this git revision instead of the working tree",
    )
    parser.add_argument(
        "--compare",
        metavar="REVISION",
        help="also run src/ as of this git revision, unchanged, as the variant 'before'",
    )
    parser.add_argument(
        "--variants",
        help=f"comma-separated lever variants to run besides baseline (default all: "
        f"{','.join(name for name in VARIANTS if name != 'baseline')})",
    )
    parser.add_argument(
        "--rates-only",
        action="store_true",
        help="skip the socket, profile, memory and zipapp measurements",
    )
    parser.add_argument("--py-spy", default=str(Path(sys.executable).parent / "py-spy"))
    options = parser.parse_args()
    if options.quick:
        options.rounds, options.seconds = 1, 2.0
    options.variants = _selected_variants(parser, options.variants)

    work = REPO_ROOT / "build" / "bench" / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True)
    processes = Processes(work)
    atexit.register(processes.stop_all)
    print(f"benchmark: work folder {work}", flush=True)
    if options.output is None:
        options.output = work / "benchmarks.md" if options.quick else DOCS_REPORT
    if options.source:
        source = stack_module.use_source(options.source, work)
    else:
        # A copy, so that editing src/ during a run cannot change the later rounds.
        source = stack_module.use_worktree_copy(work)
    print(f"benchmark: ephemwork from {source}", flush=True)

    # SIGTERM unwinds like Ctrl-C, so the finally blocks below stop every child.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if options.compare:
        options.compare_source = stack_module.export_source(options.compare, work)
        print(f"benchmark: variant 'before' from {options.compare_source}", flush=True)
    sshd = start_bench_sshd(work)
    atexit.register(sshd.stop)
    try:
        results = run_all(options, work, processes, sshd)
    finally:
        processes.stop_all()
        sshd.stop()

    text = report.render(results, options.output)
    options.output.write_text(text, encoding="utf-8")
    print(text)
    print(f"benchmark: wrote {options.output}", flush=True)


def run_all(
    options: argparse.Namespace, work: Path, processes: Processes, sshd: SshdServer
) -> report.Results:
    """Run every round, then memory, socket options, profiles and zipapp timing."""
    backends = start_backends(processes, work)
    reference = start_reference(processes, work, sshd, backends)
    results = report.Results(rounds=options.rounds, seconds=options.seconds)

    for round_index in range(options.rounds):
        print(f"benchmark: round {round_index + 1} of {options.rounds}", flush=True)
        for load in LOADS:
            for user, path_name in (("sshn", "nginx + ssh -N -R"), ("sshtt", "nginx + ssh -tt -R")):
                result = _run(options, reference.proxy_port, f"{user}:{load.backend}", load)
                results.add(path_name, load.name, round_index, result)

        for variant, levers, source in _round_variants(options):
            stack = start_ephemwork(
                processes,
                work,
                sshd,
                backends,
                levers,
                name=f"{variant}-{round_index}",
                source=source,
            )
            try:
                for load in LOADS:
                    if variant not in ("baseline", "before") and not load.for_levers:
                        continue
                    result = _run(options, stack.proxy_port, f"bench:{load.backend}", load)
                    results.add(f"ephemwork {variant}", load.name, round_index, result)
            finally:
                processes.stop(stack.bastion)
                if stack.up is not None:
                    processes.stop(stack.up)

    if options.rates_only:
        return results
    results.nodelay = measure_nodelay(
        work, processes, sshd, backends, reference, results.cpu_shares, results.cpu_rates
    )
    results.profiles = measure_profiles(options, work, processes, sshd, backends)
    results.memory = {
        variant: memory.measure(processes, work, sshd, backends, VARIANTS[variant], variant)
        for variant in ("baseline", SECOND_VARIANT)
    }
    results.zipapp = memory.measure_zipapp(work)
    return results


def _selected_variants(parser: argparse.ArgumentParser, text: str | None) -> list[str]:
    if text is None:
        return list(VARIANTS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; use some of {', '.join(VARIANTS)}")
    return ["baseline", *(name for name in names if name != "baseline")]


def _round_variants(options: argparse.Namespace) -> list[tuple[str, str, Path | None]]:
    """Return (variant, levers, source folder) for every ephemwork run of one round."""
    variants: list[tuple[str, str, Path | None]] = []
    if options.compare:
        variants.append(("before", "", options.compare_source))
    variants += [(name, VARIANTS[name], None) for name in options.variants]
    return variants


def _run(options: argparse.Namespace, proxy_port: int, route: str, load: Load) -> WrkResult:
    url = f"http://127.0.0.1:{proxy_port}{load.path}"
    result = run_wrk(url, route, connections=load.connections, seconds=options.seconds)
    print(
        f"  {route:<16} {load.name:<12} {result.requests_per_second:>9.0f} req/s "
        f"p50 {result.p50_ms:7.2f} ms p99 {result.p99_ms:7.2f} ms "
        f"{result.mib_per_second:7.1f} MiB/s errors {result.errors}",
        flush=True,
    )
    return result


def measure_nodelay(
    work: Path,
    processes: Processes,
    sshd: SshdServer,
    backends: Backends,
    reference: Reference,
    cpu_shares: dict[str, dict[str, float]],
    cpu_rates: dict[str, float],
) -> list[report.NodelayRow]:
    """Read TCP_NODELAY on every hop's live sockets while wrk keeps 16 connections open."""
    if not probes.pidfd_getfd_supported():
        return []
    rows: list[report.NodelayRow] = []
    sshd_pid = sshd.process.pid
    port_names = {
        sshd.port: "sshd",
        backends.fast_port: "backend fast",
        backends.uvicorn_port: "backend uvicorn",
        reference.proxy_port: "nginx listener",
    }
    for (user, backend), port in reference.tunnel_ports.items():
        port_names[port] = f"tunnel port ({user} {backend})"

    reference_processes = {
        "nginx": reference.nginx.pid,
        "ssh -N": reference.ssh_n.pid,
        "ssh -tt": reference.ssh_tt.pid,
    }
    for user in ("sshn", "sshtt"):
        rows += _probe_during_load(
            f"reference {user}",
            reference.proxy_port,
            f"{user}:uvicorn",
            {**reference_processes, "sshd": sshd_pid},
            port_names,
            backends.uvicorn_pid,
            cpu_shares,
            cpu_rates,
        )

    for variant in ("baseline", "nopty"):
        stack = start_ephemwork(
            processes,
            work,
            sshd,
            backends,
            VARIANTS[variant],
            name=f"nodelay-{variant}",
        )
        try:
            names = {**port_names, stack.proxy_port: "bastion listener"}
            for service, port in stack.tunnel_ports.items():
                names[port] = f"tunnel port (bench {service})"
            assert stack.up is not None
            rows += _probe_during_load(
                f"ephemwork {variant}",
                stack.proxy_port,
                "bench:uvicorn",
                {"serve-bastion": stack.bastion.pid, "up": stack.up.pid, "sshd": sshd_pid},
                names,
                backends.uvicorn_pid,
                cpu_shares,
                cpu_rates,
            )
        finally:
            processes.stop(stack.bastion)
            if stack.up is not None:
                processes.stop(stack.up)
    return rows


def _probe_during_load(
    path: str,
    proxy_port: int,
    route: str,
    roots: dict[str, int],
    port_names: dict[int, str],
    backend_pid: int,
    cpu_shares: dict[str, dict[str, float]],
    cpu_rates: dict[str, float],
) -> list[report.NodelayRow]:
    """Probe TCP_NODELAY while wrk runs, and record each process's CPU use in *cpu_shares*.

    *cpu_rates* gets the requests per second of that wrk run.
    """
    cpu_roots = {**roots, "uvicorn backend": backend_pid}
    url = f"http://127.0.0.1:{proxy_port}/json"
    wrk_results: list[WrkResult] = []
    wrk = threading.Thread(
        target=lambda: wrk_results.append(run_wrk(url, route, connections=16, seconds=3.0))
    )
    cpu_before = {role: probes.cpu_seconds(root) for role, root in cpu_roots.items()}
    started = time.monotonic()
    wrk.start()
    time.sleep(1.5)

    found = [
        (role, option)
        for role, root in roots.items()
        for pid in probes.descendants(root)
        for option in probes.nodelay_of_process(pid)
    ]
    # The ephemeral port of a client socket names its owner at the other end, so sshd's
    # accepted SSH connections show which client (ssh -N, ssh -tt or up) they serve.
    owners = {option.local_port: role for role, option in found if role != "sshd"}

    counts: dict[tuple[str, str, str, bool], int] = {}
    for role, option in found:
        local = port_names.get(option.local_port)
        remote = port_names.get(option.remote_port)
        if local is None and remote is None:
            continue
        key = (
            role,
            local or "client end",
            remote or f"{owners.get(option.remote_port, 'client')} end",
            option.nodelay,
        )
        counts[key] = counts.get(key, 0) + 1
    wrk.join()
    elapsed = time.monotonic() - started
    cpu_after = {role: probes.cpu_seconds(root) for role, root in cpu_roots.items()}
    cpu_shares[path] = {
        role: 100 * (cpu_after[role] - cpu_before[role]) / elapsed for role in cpu_roots
    }
    if wrk_results:
        cpu_rates[path] = wrk_results[0].requests_per_second
    return [
        report.NodelayRow(path, role, local, remote, nodelay, count)
        for (role, local, remote, nodelay), count in sorted(counts.items())
    ]


def measure_profiles(
    options: argparse.Namespace,
    work: Path,
    processes: Processes,
    sshd: SshdServer,
    backends: Backends,
) -> dict[str, probes.ProfileSummary]:
    """Profile serve-bastion and up with py-spy under the uvicorn c16 load."""
    summaries: dict[str, probes.ProfileSummary] = {}
    seconds = max(options.seconds, 4.0)
    for variant in ("baseline", SECOND_VARIANT):
        stack = start_ephemwork(
            processes,
            work,
            sshd,
            backends,
            VARIANTS[variant],
            name=f"profile-{variant}",
        )
        try:
            assert stack.up is not None
            targets = {"serve-bastion": stack.bastion.pid, "up": stack.up.pid}
            with concurrent.futures.ThreadPoolExecutor(len(targets)) as pool:
                futures = {
                    role: pool.submit(
                        probes.record_profile,
                        options.py_spy,
                        pid,
                        seconds,
                        work / f"profile-{variant}-{role}.txt",
                    )
                    for role, pid in targets.items()
                }
                time.sleep(0.5)
                run_wrk(
                    f"http://127.0.0.1:{stack.proxy_port}/json",
                    "bench:uvicorn",
                    connections=16,
                    seconds=seconds,
                )
                for role, future in futures.items():
                    try:
                        summaries[f"{role} ({variant})"] = probes.summarize_profile(future.result())
                    except subprocess.CalledProcessError as exc:
                        print(f"benchmark: py-spy failed for {role}: {exc.stderr!r}", flush=True)
        finally:
            processes.stop(stack.bastion)
            if stack.up is not None:
                processes.stop(stack.up)
    return summaries


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH_DIR))
    main()
