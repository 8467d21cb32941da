"""HTTP overhead benchmark: bastion's defaults against bare Starlette and FastAPI, over loopback.

One run serves the same small JSON endpoint (``GET /items/42``) from four
uvicorn processes (bare Starlette, bare FastAPI, and each with
``bastion.install(app)`` at its defaults), loads each in turn with wrk, and
prints requests per second, p50 and p99 latency, and the ratio of each bastion
variant to its bare baseline measured in the same run. It also prints each
server's CPU time per request and the ratio of those: on a shared machine,
other processes and the hypervisor take the core away at random and move
req/s by tens of percent between runs, while CPU time per request moves much
less; the run says how busy the machine was.

The bastion variants run with ``logging.format=json`` and their standard output
redirected to a file, so the access line of every request is really written.
Their database is SQLite under a temporary directory. Server and load generator
are pinned to different cores when ``taskset`` exists, and rounds alternate the
variants so that drift on a shared machine hits all of them alike.

It is a benchmark, not a test: it exits 0 and prints, and exits 1 only when a
variant fails to start or a load run errors.

Usage:
    .venv/bin/python bench/http_overhead.py [--duration 10] [--connections 64]
        [--threads 1] [--rounds 5] [--warmup 3] [--json results.json]

Needs wrk on the PATH (Debian/Ubuntu: ``apt-get install -y wrk``; macOS: ``brew install wrk``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _apps import PATH, VARIANTS
from _machine import describe, format_description
from _server import server_options

HERE = Path(__file__).resolve().parent

# Baseline first, then its bastion variant: each pair runs back to back, and the
# order inside a pair flips every round (see _order).
PAIRS = (("fastapi", "fastapi+bastion"), ("starlette", "starlette+bastion"))
STARTUP_TIMEOUT = 60.0


class BenchError(Exception):
    """A variant failed to start, or a load run errored."""


@dataclass
class Server:
    """One running variant."""

    variant: str
    port: int
    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATH}"

    def failure(self) -> str:
        """Return the tail of the server's standard error, for a failure message."""
        lines = self.stderr.read_text(errors="replace").splitlines()
        return "\n".join(lines[-20:])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _pin(cpu: int | None) -> list[str]:
    if cpu is None:
        return []
    return ["taskset", "-c", str(cpu)]


def _cpus() -> tuple[int | None, int | None]:
    """Return (server core, load generator core), or Nones when pinning is impossible."""
    if shutil.which("taskset") is None or (os.cpu_count() or 1) < 2:
        return None, None
    return 0, 1


def _start(variant: str, workdir: Path, cpu: int | None) -> Server:
    port = _free_port()
    stdout = workdir / f"{variant}.stdout.log"
    stderr = workdir / f"{variant}.stderr.log"
    env = {
        **os.environ,
        "BASTION_DATABASE__URL": f"sqlite+aiosqlite:///{workdir}/{variant}.db",
        "BASTION_LOGGING__FORMAT": "json",
        # No bastion.toml from wherever the benchmark was started.
        "BASTION_CONFIG_FILE": str(workdir / "absent.toml"),
    }
    env.pop("PYTHONUNBUFFERED", None)
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(
            [*_pin(cpu), sys.executable, str(HERE / "_server.py"), variant, str(port)],
            stdout=out,
            stderr=err,
            cwd=workdir,
            env=env,
        )
    return Server(variant, port, process, stdout, stderr)


def _wait_ready(server: Server) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise BenchError(
                f"{server.variant} exited with {server.process.returncode} during start-up:\n"
                + server.failure()
            )
        try:
            with urllib.request.urlopen(server.url, timeout=1) as response:  # noqa: S310 -- loopback
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise BenchError(
        f"{server.variant} not ready after {STARTUP_TIMEOUT:.0f} s:\n" + server.failure()
    )


def _server_cpu_ns(pid: int) -> int | None:
    """Return the CPU time all threads of ``pid`` have used, in ns (Linux), else None."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += int((task / "schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total


def _machine_cpu_ns() -> tuple[int, int] | None:
    """Return (CPU time all processes used, CPU time the hypervisor stole), in ns (Linux)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) * tick, steal * tick


def _children_cpu_ns() -> int:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return int((usage.ru_utime + usage.ru_stime) * 1e9)


def _wrk(
    server: Server, args: argparse.Namespace, duration: int, cpu: int | None
) -> dict[str, Any]:
    command = [
        *_pin(cpu),
        "wrk",
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{duration}s",
        "-s",
        str(HERE / "wrk_report.lua"),
        server.url,
    ]
    server_before = _server_cpu_ns(server.process.pid)
    machine_before, children_before = _machine_cpu_ns(), _children_cpu_ns()
    wall_before = time.perf_counter_ns()
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter_ns() - wall_before
    server_after, machine_after = _server_cpu_ns(server.process.pid), _machine_cpu_ns()
    wrk_cpu = _children_cpu_ns() - children_before
    if completed.returncode != 0:
        raise BenchError(f"wrk failed on {server.variant}: {completed.stderr.strip()}")
    if server.process.poll() is not None:
        raise BenchError(f"{server.variant} died under load:\n" + server.failure())
    for line in completed.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            result: dict[str, Any] = json.loads(line.removeprefix("WRK_JSON "))
            break
    else:
        raise BenchError(f"no summary from wrk on {server.variant}:\n{completed.stdout}")
    # Socket errors and non-2xx answers mean the variant is broken. A timeout (no
    # answer within wrk's 2 s) is only latency, which a busy shared machine causes:
    # it is counted and printed, not fatal.
    errors = {key: result[key] for key in result if key.endswith("_errors")}
    if any(errors.values()):
        raise BenchError(f"{server.variant} errored under load: {errors}")
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    if server_before is not None and server_after is not None:
        server_cpu = server_after - server_before
        # CPU per request does not shrink when other processes take the core away,
        # so it still measures bastion's cost on a busy machine, where req/s cannot.
        result["server_cpu_us_per_request"] = server_cpu / 1000 / result["requests"]
        if machine_before is not None and machine_after is not None:
            capacity = wall * (os.cpu_count() or 1)
            others = machine_after[0] - machine_before[0] - server_cpu - wrk_cpu
            result["other_load_pct"] = max(0.0, 100 * others / capacity)
            # Time the hypervisor gave this VM's CPUs to other guests: invisible
            # to every process here, and a slower machine while it lasts.
            result["steal_pct"] = 100 * (machine_after[1] - machine_before[1]) / capacity
    return result


def _order(round_no: int) -> list[str]:
    """Pairs alternate which runs first, and which member of a pair runs first."""
    pairs = PAIRS if round_no % 2 == 0 else PAIRS[::-1]
    return [name for pair in pairs for name in (pair if round_no % 2 == 0 else pair[::-1])]


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [run[key] for run in runs if key in run]
    return statistics.median(values) if values else None


def _summarize(servers: dict[str, Server]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for name, server in servers.items():
        runs = server.runs
        summary[name] = {
            "rps": _median(runs, "rps"),
            "p50_ms": statistics.median(run["latency_p50_us"] for run in runs) / 1000,
            "p99_ms": statistics.median(run["latency_p99_us"] for run in runs) / 1000,
            "cpu_us": _median(runs, "server_cpu_us_per_request"),
            "other_load_pct": _median(runs, "other_load_pct"),
            "steal_pct": _median(runs, "steal_pct"),
            "timeouts": sum(run["timeouts"] for run in runs),
            "rps_rounds": [round(run["rps"], 1) for run in runs],
        }
    for name, (_, baseline) in VARIANTS.items():
        if baseline is None:
            continue
        mine, theirs = summary[name], summary[baseline]
        mine["baseline"] = baseline
        mine["ratio"] = mine["rps"] / theirs["rps"]
        mine["ratio_rounds"] = [
            round(a["rps"] / b["rps"], 3)
            for a, b in zip(servers[name].runs, servers[baseline].runs, strict=True)
        ]
        # A saturated single-process server spends 1/rps seconds per request, so
        # the difference is bastion's cost per request as the client sees it.
        mine["overhead_us"] = 1e6 / mine["rps"] - 1e6 / theirs["rps"]
        if mine["cpu_us"] is not None and theirs["cpu_us"] is not None:
            # The same ratio from the servers' CPU time per request: it holds when
            # other processes share the machine and req/s does not.
            mine["cpu_ratio"] = theirs["cpu_us"] / mine["cpu_us"]
            mine["cpu_overhead_us"] = mine["cpu_us"] - theirs["cpu_us"]
    return summary


def _print(summary: dict[str, dict[str, Any]], facts: dict[str, Any], setup: str) -> None:
    print(format_description(facts))
    print(setup)
    print()
    header = (
        f"{'variant':<20}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'ratio':>8}"
        f"{'CPU µs/req':>12}{'CPU ratio':>11}  per-round req/s"
    )
    print(header)
    print("-" * len(header))
    for name in VARIANTS:
        row = summary[name]
        ratio = f"{row['ratio']:.3f}" if "ratio" in row else "-"
        cpu = f"{row['cpu_us']:.1f}" if row["cpu_us"] is not None else "-"
        cpu_ratio = f"{row['cpu_ratio']:.3f}" if "cpu_ratio" in row else "-"
        rounds = ", ".join(f"{rps:.0f}" for rps in row["rps_rounds"])
        print(
            f"{name:<20}{row['rps']:>9.0f}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}"
            f"{ratio:>8}{cpu:>12}{cpu_ratio:>11}  {rounds}"
        )
    print()
    for name, row in summary.items():
        if "ratio" not in row:
            continue
        per_round = ", ".join(f"{ratio:.3f}" for ratio in row["ratio_rounds"])
        print(
            f"{name} / {row['baseline']}: {row['ratio']:.3f} of bare req/s "
            f"(per round: {per_round}; their median "
            f"{statistics.median(row['ratio_rounds']):.3f}); "
            f"{row['overhead_us']:+.1f} µs per request"
        )
        if "cpu_ratio" in row:
            print(
                f"{'':>{len(name) + len(row['baseline']) + 3}}  {row['cpu_ratio']:.3f} by server "
                f"CPU time per request; {row['cpu_overhead_us']:+.1f} µs of CPU per request"
            )
    timeouts = {name: row["timeouts"] for name, row in summary.items() if row["timeouts"]}
    if timeouts:
        print(f"requests unanswered within wrk's 2 s timeout: {timeouts}")
    loads = [row["other_load_pct"] for row in summary.values() if row["other_load_pct"] is not None]
    steals = [row["steal_pct"] for row in summary.values() if row["steal_pct"] is not None]
    if loads and steals:
        busiest, stolen = max(loads), max(steals)
        note = (
            "; req/s and latency are unreliable on a machine this busy: trust the CPU "
            "columns, or run again when it is idle"
            if busiest > 10 or stolen > 10
            else ""
        )
        print(
            f"during runs, other processes used up to {busiest:.0f}% of the machine and "
            f"the hypervisor stole up to {stolen:.0f}%{note}"
        )


def _wrk_version() -> str:
    completed = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    first = (completed.stdout or completed.stderr).strip().splitlines()
    return first[0].split(" [")[0].removeprefix("wrk ") if first else "unknown"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the whole benchmark; return everything measured."""
    server_cpu, load_cpu = _cpus()
    facts = describe(wrk=_wrk_version(), **server_options())
    with tempfile.TemporaryDirectory(prefix="bastion-http-bench-") as tmp:
        workdir = Path(tmp)
        servers = {name: _start(name, workdir, server_cpu) for name in VARIANTS}
        try:
            for server in servers.values():
                _wait_ready(server)
            for server in servers.values():
                _wrk(server, args, args.warmup, load_cpu)
            for round_no in range(args.rounds):
                for name in _order(round_no):
                    servers[name].runs.append(_wrk(servers[name], args, args.duration, load_cpu))
        finally:
            for server in servers.values():
                server.process.terminate()
            for server in servers.values():
                try:
                    server.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    server.process.kill()
        access_logs = {
            name: {
                "bytes": server.stdout.stat().st_size,
                "lines": server.stdout.read_bytes().count(b'"event":"request"'),
            }
            for name, server in servers.items()
            if VARIANTS[name][1] is not None
        }
        summary = _summarize(servers)
    pinning = (
        f"server on core {server_cpu}, wrk on core {load_cpu} (taskset)"
        if server_cpu is not None
        else "no core pinning (taskset missing or one core)"
    )
    logs = "; ".join(
        f"{name} {log['lines']} lines, {log['bytes']} bytes" for name, log in access_logs.items()
    )
    setup = (
        f"load: wrk -t{args.threads} -c{args.connections} -d{args.duration}s GET {PATH} "
        f"over loopback, {args.rounds} rounds after a {args.warmup}s warm-up, "
        f"medians reported; uvicorn 1 process, loop={facts['loop']}, http={facts['http']}, "
        f"uvicorn access log off; {pinning}\n"
        f"bastion variants: install(app) defaults, logging.format=json, stdout redirected to "
        f"a file on disk (access log written: {logs}); SQLite in a temporary directory"
    )
    _print(summary, facts, setup)
    return {
        "machine": facts,
        "setup": setup,
        "options": vars(args) | {"json": str(args.json) if args.json else None},
        "summary": summary,
        "runs": {name: server.runs for name, server in servers.items()},
        "access_logs": access_logs,
    }


def main() -> int:
    """Parse options, run, print; exit 1 only on a failed variant."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; medians are reported")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of warm-up per variant")
    parser.add_argument("--json", type=Path, help="also write all results to this file")
    args = parser.parse_args()

    if shutil.which("wrk") is None:
        print(
            "error: wrk is not installed. Install it with `apt-get install -y wrk` "
            "(Debian/Ubuntu) or `brew install wrk` (macOS), then run again.",
            file=sys.stderr,
        )
        return 1
    try:
        results = run(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
