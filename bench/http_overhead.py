"""HTTP overhead benchmark: bastion against bare Starlette and FastAPI and the usual assembly.

One run serves the same small JSON endpoint (``GET /items/42``) from one
uvicorn process per variant (bare Starlette, bare FastAPI, each with
``bastion.install(app)`` at its defaults, FastAPI with bastion's metrics, JSON
access log and tracing at 10% and at 100% sampling exported over OTLP/HTTP, and
FastAPI with the usual PyPI assembly for the same features), loads each in turn
with wrk, and prints requests per second, p50 and p99 latency, and the ratio of
each variant to its bare baseline measured in the same run, then whether the
observability targets are met (printed, never asserted). It also prints each
server's CPU time per request and the ratio of those: on a shared machine,
other processes and the hypervisor take the core away at random and move
req/s by tens of percent between runs, while CPU time per request moves much
less; the run says how busy the machine was.

The bastion variants run with ``logging.format=json`` and their standard output
redirected to a file, so the access line of every request is really written
(the assembly's structlog line likewise). Their database is SQLite under a
temporary directory. Each variant that exports spans gets its own OTLP/HTTP
receiver (``_receiver.py``), a separate process on the load generator's core
that answers at once and only counts spans; the run prints how many spans each
received against how many it should have, and whether the metrics scrape
answered, so a variant whose feature is missing or broken says so. Server and load generator
are pinned to different cores when ``taskset`` exists, and rounds alternate the
variants so that drift on a shared machine hits all of them alike.

It is a benchmark, not a test: it exits 0 and prints. A variant that fails to
start or errors under load is reported and left out, the others are still
measured, and the run then exits 1.

Usage:
    .venv/bin/python bench/http_overhead.py [--duration 10] [--connections 64]
        [--threads 1] [--rounds 5] [--warmup 3] [--variants a,b,...] [--json results.json]

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

from _apps import EXPORTING, PATH, SAMPLE_RATIO, SCRAPED, VARIANTS
from _machine import describe, format_description
from _server import server_options

HERE = Path(__file__).resolve().parent

# Each baseline and the variants compared with it run back to back; the order of
# the groups flips every round and the order inside a group rotates (see _order).
GROUPS = (
    (
        "fastapi",
        "fastapi+bastion",
        "fastapi+bastion-obs10",
        "fastapi+bastion-obs100",
        "fastapi+assembly",
    ),
    ("starlette", "starlette+bastion"),
)
STARTUP_TIMEOUT = 60.0
# Seconds for servers to flush their span queues after SIGTERM before the
# receivers are read: a BatchSpanProcessor exports what it holds on shutdown.
FLUSH_TIMEOUT = 10.0


@dataclass(frozen=True)
class Target:
    """A ratio of req/s the issue asks for: ``variant`` over ``other`` at least ``minimum``."""

    variant: str
    other: str
    minimum: float
    text: str


TARGETS = (
    Target("fastapi+bastion-obs10", "fastapi", 0.70, "keeps >= 70% of bare FastAPI's req/s"),
    Target("fastapi+bastion-obs100", "fastapi+assembly", 5.0, "serves >= 5x the assembly's req/s"),
)


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
    requests_sent: int = 0
    receiver: Receiver | None = None
    checks: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATH}"

    def failure(self) -> str:
        """Return the tail of the server's standard error, for a failure message."""
        lines = self.stderr.read_text(errors="replace").splitlines()
        return "\n".join(lines[-20:])


@dataclass
class Receiver:
    """The OTLP/HTTP receiver one exporting variant sends its spans to."""

    port: int
    process: subprocess.Popen[bytes]
    stderr: Path

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, Any]:
        """Return what the receiver has counted so far."""
        with urllib.request.urlopen(f"{self.endpoint}/stats", timeout=5) as response:  # noqa: S310 -- loopback
            stats: dict[str, Any] = json.loads(response.read())
            return stats


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


def _start_receiver(variant: str, workdir: Path, cpu: int | None) -> Receiver:
    port = _free_port()
    stderr = workdir / f"{variant}.receiver.stderr.log"
    with stderr.open("wb") as err:
        process = subprocess.Popen(
            [*_pin(cpu), sys.executable, str(HERE / "_receiver.py"), str(port)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=workdir,
        )
    receiver = Receiver(port, process, stderr)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"the OTLP receiver for {variant} exited:\n" + stderr.read_text())
        try:
            receiver.stats()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
        else:
            return receiver
    raise BenchError(f"the OTLP receiver for {variant} did not start")


def _start(variant: str, workdir: Path, cpu: int | None, receiver: Receiver | None) -> Server:
    port = _free_port()
    stdout = workdir / f"{variant}.stdout.log"
    stderr = workdir / f"{variant}.stderr.log"
    env = {
        # The OpenTelemetry SDK reads OTEL_* variables: none from the caller's shell.
        **{key: value for key, value in os.environ.items() if not key.startswith("OTEL_")},
        "BASTION_DATABASE__URL": f"sqlite+aiosqlite:///{workdir}/{variant}.db",
        "BASTION_LOGGING__FORMAT": "json",
        # No bastion.toml from wherever the benchmark was started.
        "BASTION_CONFIG_FILE": str(workdir / "absent.toml"),
    }
    if receiver is not None:
        env["BENCH_OTLP_ENDPOINT"] = receiver.endpoint
    env.pop("PYTHONUNBUFFERED", None)
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(
            [*_pin(cpu), sys.executable, str(HERE / "_server.py"), variant, str(port)],
            stdout=out,
            stderr=err,
            cwd=workdir,
            env=env,
        )
    return Server(variant, port, process, stdout, stderr, receiver=receiver)


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


def _check_scrape(server: Server) -> None:
    """Note whether the variant's metrics scrape answers with the metric it must hold."""
    if server.variant not in SCRAPED:
        return
    path, metric = SCRAPED[server.variant]
    url = f"http://127.0.0.1:{server.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        server.checks.append(f"NOT AS SPECIFIED: GET {path} answered {exc.code}: no metrics")
        return
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        server.checks.append(f"NOT AS SPECIFIED: GET {path} failed: {exc}")
        return
    if metric in body:
        server.checks.append(f"GET {path}: 200 with {metric}")
    else:
        server.checks.append(f"NOT AS SPECIFIED: GET {path} answered without {metric}")


def _check_spans(server: Server) -> dict[str, Any] | None:
    """Note how many spans the variant's receiver got against how many it should have."""
    if server.receiver is None:
        return None
    try:
        stats = server.receiver.stats()
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        server.checks.append(f"the OTLP receiver could not be read: {exc}")
        return None
    # One server span per sampled request; instrumentations may add internal
    # spans (OpenTelemetry's ASGI one adds a span per receive and send).
    expected = server.requests_sent * SAMPLE_RATIO[server.variant]
    spans = stats["server_spans"]
    paths = ", ".join(f"{n} to {path}" for path, n in stats["requests"].items()) or "none"
    share = f" ({100 * spans / expected:.0f}% of ~{expected:.0f} sampled)" if expected else ""
    line = (
        f"server spans received: {spans}{share}, {stats['spans']} spans in all; "
        f"export requests: {paths}"
    )
    if stats["names"]:
        line += "; spans by kind and name: " + ", ".join(
            f"{key} x{count}" for key, count in sorted(stats["names"].items())
        )
    if stats["undecoded"]:
        line += f"; {stats['undecoded']} bodies not OTLP"
    if spans == 0:
        line = f"NOT AS SPECIFIED: no spans reached the receiver (tracing off?); {line}"
    elif expected and spans < 0.5 * expected:
        # A BatchSpanProcessor drops spans when its queue is full: the variant then
        # did less work than its name says, and its figures flatter it.
        line = "FEWER SPANS THAN SAMPLED (exporter dropped some): " + line
    server.checks.append(line)
    return stats


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
    receiver_pid = server.receiver.process.pid if server.receiver else None
    receiver_before = _server_cpu_ns(receiver_pid) if receiver_pid else 0
    server_before = _server_cpu_ns(server.process.pid)
    machine_before, children_before = _machine_cpu_ns(), _children_cpu_ns()
    wall_before = time.perf_counter_ns()
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter_ns() - wall_before
    server_after, machine_after = _server_cpu_ns(server.process.pid), _machine_cpu_ns()
    wrk_cpu = _children_cpu_ns() - children_before
    receiver_after = _server_cpu_ns(receiver_pid) if receiver_pid else 0
    # The receiver is part of the benchmark, not another process competing with it.
    receiver_cpu = (receiver_after or 0) - (receiver_before or 0)
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
            others = machine_after[0] - machine_before[0] - server_cpu - wrk_cpu - receiver_cpu
            result["other_load_pct"] = max(0.0, 100 * others / capacity)
            # Time the hypervisor gave this VM's CPUs to other guests: invisible
            # to every process here, and a slower machine while it lasts.
            result["steal_pct"] = 100 * (machine_after[1] - machine_before[1]) / capacity
    return result


def _order(round_no: int, names: list[str]) -> list[str]:
    """Groups alternate which runs first; inside a group the order rotates every round."""
    groups = GROUPS if round_no % 2 == 0 else GROUPS[::-1]
    order = []
    for group in groups:
        members = [name for name in group if name in names]
        if members:
            shift = round_no % len(members)
            order += members[shift:] + members[:shift]
    return order


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
    for name, server in servers.items():
        baseline = VARIANTS[name][1]
        if baseline is None or baseline not in servers:
            continue
        mine, theirs = summary[name], summary[baseline]
        mine["baseline"] = baseline
        mine["ratio"] = mine["rps"] / theirs["rps"]
        mine["ratio_rounds"] = [
            round(a["rps"] / b["rps"], 3)
            for a, b in zip(server.runs, servers[baseline].runs, strict=True)
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


def _print_targets(summary: dict[str, dict[str, Any]]) -> None:
    print()
    print("targets (printed, never asserted):")
    for target in TARGETS:
        mine, theirs = summary.get(target.variant), summary.get(target.other)
        label = f"  {target.variant} {target.text}:"
        if mine is None or theirs is None:
            print(f"{label} not measured ({target.variant} or {target.other} missing)")
            continue
        by_rps = mine["rps"] / theirs["rps"]
        verdict = "met" if by_rps >= target.minimum else "not met"
        line = f"{label} {verdict} by req/s ({by_rps:.3f}, needs {target.minimum:g})"
        if mine["cpu_us"] is not None and theirs["cpu_us"] is not None:
            by_cpu = theirs["cpu_us"] / mine["cpu_us"]
            cpu_verdict = "met" if by_cpu >= target.minimum else "not met"
            line += f"; {cpu_verdict} by server CPU per request ({by_cpu:.3f})"
        print(line)


def _print(
    summary: dict[str, dict[str, Any]],
    facts: dict[str, Any],
    setup: str,
    checks: dict[str, list[str]],
    failures: dict[str, str],
) -> None:
    print(format_description(facts))
    print(setup)
    print()
    header = (
        f"{'variant':<24}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'ratio':>8}"
        f"{'CPU µs/req':>12}{'CPU ratio':>11}  per-round req/s"
    )
    print(header)
    print("-" * len(header))
    for name in VARIANTS:
        if name not in summary:
            continue
        row = summary[name]
        ratio = f"{row['ratio']:.3f}" if "ratio" in row else "-"
        cpu = f"{row['cpu_us']:.1f}" if row["cpu_us"] is not None else "-"
        cpu_ratio = f"{row['cpu_ratio']:.3f}" if "cpu_ratio" in row else "-"
        rounds = ", ".join(f"{rps:.0f}" for rps in row["rps_rounds"])
        print(
            f"{name:<24}{row['rps']:>9.0f}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}"
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
    _print_targets(summary)
    if any(checks.values()):
        print()
        print("what each instrumented variant really did:")
        for name, lines in checks.items():
            for line in lines:
                print(f"  {name}: {line}")
    if failures:
        print()
        print("NOT MEASURED (failed to start or errored under load; the others ran):")
        for name, failure in failures.items():
            indented = "\n".join(f"    {line}" for line in failure.splitlines())
            print(f"  {name}:\n{indented}")


def _wrk_version() -> str:
    completed = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    first = (completed.stdout or completed.stderr).strip().splitlines()
    return first[0].split(" [")[0].removeprefix("wrk ") if first else "unknown"


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=FLUSH_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _load(servers: dict[str, Server], failures: dict[str, str], name: str, run: Any) -> None:
    """Run one wrk load on ``name``; a variant that breaks is dropped, the others go on."""
    server = servers[name]
    try:
        result = run(server)
    except BenchError as exc:
        failures[name] = str(exc)
        _stop([server.process])
        del servers[name]
        return
    server.requests_sent += result["requests"]


def run(args: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    """Run the whole benchmark; return everything measured, and whether every variant ran."""
    server_cpu, load_cpu = _cpus()
    facts = describe(wrk=_wrk_version(), **server_options())
    names = [name for name in VARIANTS if name in args.variants]
    failures: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bastion-http-bench-") as tmp:
        workdir = Path(tmp)
        receivers: dict[str, Receiver] = {}
        servers: dict[str, Server] = {}
        started: list[Server] = []
        try:
            for name in names:
                if name in EXPORTING:
                    # On the load generator's core: receiving spans must not take
                    # the measured server's CPU time.
                    receivers[name] = _start_receiver(name, workdir, load_cpu)
            started = [_start(name, workdir, server_cpu, receivers.get(name)) for name in names]
            for server in started:
                try:
                    _wait_ready(server)
                except BenchError as exc:
                    failures[server.variant] = str(exc)
                    _stop([server.process])
                else:
                    servers[server.variant] = server
                    _check_scrape(server)
            for name in list(servers):
                _load(servers, failures, name, lambda s: _wrk(s, args, args.warmup, load_cpu))
            for round_no in range(args.rounds):
                for name in _order(round_no, list(servers)):
                    if name not in servers:
                        continue

                    def measured(server: Server) -> dict[str, Any]:
                        result = _wrk(server, args, args.duration, load_cpu)
                        server.runs.append(result)
                        return result

                    _load(servers, failures, name, measured)
        finally:
            # Servers first: on SIGTERM they flush their span queues to the receivers.
            _stop([server.process for server in started])
        span_stats = {name: _check_spans(server) for name, server in servers.items()}
        _stop([receiver.process for receiver in receivers.values()])
        access_logs = {
            name: {
                "bytes": server.stdout.stat().st_size,
                "lines": server.stdout.read_bytes().count(b'"event":"request"')
                + server.stdout.read_bytes().count(b'"event": "request"'),
            }
            for name, server in servers.items()
            if VARIANTS[name][1] is not None
        }
        summary = _summarize(servers)
    pinning = (
        f"server on core {server_cpu}, wrk and OTLP receivers on core {load_cpu} (taskset)"
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
        f"bastion variants: install(app), logging.format=json, stdout redirected to "
        f"a file on disk (access log written: {logs}); SQLite in a temporary directory\n"
        f"-obs10/-obs100: metrics on, tracing sample_ratio 0.1/1.0, exporter otlp-http to a "
        f"local receiver; assembly: asgi-correlation-id, prometheus-fastapi-instrumentator, "
        f"opentelemetry-instrumentation-fastapi (always sampled, BatchSpanProcessor, OTLP/HTTP "
        f"to a local receiver), structlog @app.middleware('http') access line"
    )
    checks = {name: server.checks for name, server in servers.items() if server.checks}
    _print(summary, facts, setup, checks, failures)
    results = {
        "machine": facts,
        "setup": setup,
        "options": vars(args) | {"json": str(args.json) if args.json else None},
        "summary": summary,
        "runs": {name: server.runs for name, server in servers.items()},
        "access_logs": access_logs,
        "checks": checks,
        "spans": span_stats,
        "failures": failures,
    }
    return results, not failures


def _variants(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown variants {unknown}; known: {', '.join(VARIANTS)}"
        )
    return names


def main() -> int:
    """Parse options, run, print; exit 1 when a variant could not be measured."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; medians are reported")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of warm-up per variant")
    parser.add_argument(
        "--variants",
        type=_variants,
        default=list(VARIANTS),
        help="comma-separated variants to run (default: all); a variant's baseline "
        "must be among them for its ratio",
    )
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
        results, complete = run(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nresults written to {args.json}")
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
