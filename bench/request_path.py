"""Micro-benchmark: the per-request cost of bastion's layer, in-process, with no network.

Drives each variant's ASGI app directly with a fake ``receive`` and ``send``,
so what is left is the framework and bastion's Python, microsecond for
microsecond: the figure to optimize against, and with ``--profile`` the place
to find where the microseconds go. The HTTP benchmark (``http_overhead.py``)
says what a client sees; this one says why.

The access log is written for real: standard output (file descriptor 1) is
redirected to a file for the whole run, exactly as a JSON log shipped from a
container's stdout, and results are printed on the original stdout.

The variants that export spans send them to one OTLP/HTTP receiver
(``_receiver.py``) in its own process. Only the serving thread's CPU time is
counted, so the span processor's export thread (encoding and sending batches)
is left out: for those variants this figure is a lower bound, and
``http_overhead.py``, which counts every thread of the server, is the one to
judge them by.

Usage:
    .venv/bin/python bench/request_path.py [--requests 2000] [--rounds 30]
        [--batch 16] [--profile fastapi+bastion] [--variants a,b,...] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import io
import json
import os
import pstats
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _asgi import StatusSend, http_scope, receive, start_lifespan
from _machine import describe, format_description, steal_percent, steal_ticks

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]

# The variants of _apps.py plus diagnostics that split bastion's cost. They build on
# Starlette, whose smaller and steadier cost lets a microsecond show. Each is
# (base app, install() overrides[, the variant its overhead is paired with]).
_NO_LIMITS = "starlette+bastion(ratelimit off)"
# Never reached in a run, so every request is admitted (a 429 would end the run).
_HIGH = "1000000/second"
DIAGNOSTICS: dict[str, tuple[Any, ...]] = {
    "starlette+bastion(no access log)": ("starlette", {"logging": {"access_log": False}}),
    "starlette+bastion(no health routes)": ("starlette", {"health": {"enabled": False}}),
    # The rate limiter on the memory store: the per-request cost of a decision, its
    # headers and the middleware frame, paired with the same app without a limiter.
    _NO_LIMITS: ("starlette", {"ratelimit": {"enabled": False}}),
    "starlette+bastion(ratelimit)": ("starlette", {"ratelimit": {"default": _HIGH}}, _NO_LIMITS),
    "starlette+bastion(ratelimit: 2 limits)": (
        "starlette",
        {"ratelimit": {"default": f"{_HIGH};100000000/hour"}},
        _NO_LIMITS,
    ),
    "starlette+bastion(ratelimit: no headers)": (
        "starlette",
        {"ratelimit": {"default": _HIGH, "headers": False}},
        _NO_LIMITS,
    ),
}


async def _run(app: ASGIApp, scope: dict[str, Any], requests: int, batch: int) -> float:
    """Serve ``requests`` requests; return the mean CPU µs per request."""
    send = StatusSend()
    sleep = asyncio.sleep
    gc.collect()
    # CPU time of this thread, not wall time: on a shared machine other processes'
    # time slices would otherwise land in whichever variant was running.
    started = time.thread_time_ns()
    for i in range(requests):
        await app(scope.copy(), receive, send)
        if i % batch == 0:
            # Yield to the loop like a server does between batches of ready
            # requests, so the access log's once-per-turn flush runs.
            await sleep(0)
    elapsed = time.thread_time_ns() - started
    if send.status != 200:
        raise RuntimeError(f"unexpected status {send.status}")
    return elapsed / requests / 1000


def _build(name: str) -> ASGIApp:
    import _apps  # noqa: PLC0415 -- after the environment is set up

    if name in _apps.VARIANTS:
        return _apps.VARIANTS[name][0]()  # type: ignore[no-any-return]
    import bastion  # noqa: PLC0415 -- after the environment is set up

    base, overrides = DIAGNOSTICS[name][:2]
    app = _apps.bare_fastapi() if base == "fastapi" else _apps.bare_starlette()
    bastion.install(app, **overrides)
    return app


def _baseline(name: str) -> str | None:
    import _apps  # noqa: PLC0415 -- after the environment is set up

    if name in _apps.VARIANTS:
        return _apps.VARIANTS[name][1]
    entry = DIAGNOSTICS[name]
    return str(entry[2] if len(entry) > 2 else entry[0])


async def _main(args: argparse.Namespace, out: io.TextIOWrapper) -> dict[str, Any]:
    import _apps  # noqa: PLC0415 -- after the environment is set up

    names = [name for name in [*_apps.VARIANTS, *DIAGNOSTICS] if name in args.variants]
    apps = {name: _build(name) for name in names}
    shutdowns = [await start_lifespan(app) for app in apps.values()]
    scope = http_scope(_apps.PATH)
    for app in apps.values():  # warm-up: caches, route compilation, first-use paths
        await _run(app, scope, 2000, args.batch)

    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_no in range(args.rounds):
        # Rotate the order so drift (frequency, noisy neighbours) hits all alike.
        order = names[round_no % len(names) :] + names[: round_no % len(names)]
        for name in order:
            samples[name].append(await _run(apps[name], scope, args.requests, args.batch))

    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        await _run(apps[args.profile], scope, args.requests, args.batch)
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
        out.write(text.getvalue())

    for shutdown in shutdowns:
        await shutdown()

    results: dict[str, Any] = {}
    for name in names:
        median = statistics.median(samples[name])
        results[name] = {"us_per_request": round(median, 2), "rounds": samples[name]}
        base = _baseline(name)
        if base is not None and base in samples:
            # The median of per-round differences, not the difference of medians: a
            # round's variant and baseline ran seconds apart, so the host's drift
            # (this is a shared VM) mostly cancels within a pair.
            paired = [
                mine - theirs for mine, theirs in zip(samples[name], samples[base], strict=True)
            ]
            results[name]["baseline"] = base
            results[name]["overhead_us"] = round(statistics.median(paired), 2)
    return results


def _print(results: dict[str, Any], args: argparse.Namespace, log: Path, out: Any) -> None:
    print(format_description(describe()), file=out)
    print(
        f"in-process ASGI, no network, CPU time of the serving thread; "
        f"{args.requests} requests x {args.rounds} rounds, "
        f"median of rounds; overhead = median of paired per-round differences;\n"
        f"loop yielded every {args.batch} requests; access log written to a file "
        f"({log.stat().st_size} bytes this run)",
        file=out,
    )
    print(f"{'variant':<42}{'µs/request':>12}   vs its baseline (µs)", file=out)
    for name, result in results.items():
        overhead = result.get("overhead_us")
        delta = f"{overhead:+.2f} vs {result['baseline']}" if overhead is not None else ""
        print(f"{name:<42}{result['us_per_request']:>12.2f}   {delta}", file=out)


@contextlib.contextmanager
def _receiver(workdir: str) -> Iterator[None]:
    """Run an OTLP receiver for the exporting variants and point them at it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with (Path(workdir) / "receiver.stderr.log").open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve().parent / "_receiver.py"), str(port)],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the OTLP receiver did not start") from None
                time.sleep(0.1)
        os.environ["BENCH_OTLP_ENDPOINT"] = f"http://127.0.0.1:{port}"
        yield
    finally:
        process.terminate()
        process.wait(timeout=10)


def _all_names() -> list[str]:
    import _apps  # noqa: PLC0415 -- only the names, nothing is built

    return [*_apps.VARIANTS, *DIAGNOSTICS]


def _names(text: str) -> list[str]:
    known = _all_names()
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variants {unknown}; known: {', '.join(known)}")
    return names


def main() -> int:
    """Run the micro-benchmark; exit 0 unless a variant fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per variant per round")
    parser.add_argument("--rounds", type=int, default=30, help="rounds; medians are reported")
    parser.add_argument("--batch", type=int, default=16, help="requests per event-loop turn")
    parser.add_argument("--profile", metavar="VARIANT", help="cProfile one variant afterwards")
    parser.add_argument(
        "--variants",
        type=_names,
        help="comma-separated variants (default: all); a variant's baseline must be among them",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.variants is None:
        args.variants = _names(",".join(_all_names()))

    with (
        tempfile.TemporaryDirectory(prefix="bastion-bench-") as tmp,
        _receiver(tmp),
    ):
        os.environ["BASTION_DATABASE__URL"] = f"sqlite+aiosqlite:///{tmp}/bench.db"
        os.environ["BASTION_LOGGING__FORMAT"] = "json"
        os.environ["BASTION_CONFIG_FILE"] = f"{tmp}/absent.toml"
        log = Path(tmp) / "access.log"
        sys.stdout.flush()
        saved = os.dup(1)
        out = io.TextIOWrapper(os.fdopen(saved, "wb"), write_through=True)
        with log.open("wb") as log_file:
            os.dup2(log_file.fileno(), 1)
        try:
            import uvloop  # noqa: PLC0415 -- optional, as in the server

            runner: Callable[[Any], Any] = uvloop.run
        except ImportError:
            runner = asyncio.run
        steal_before, wall_before = steal_ticks(), time.monotonic()
        try:
            results = runner(_main(args, out))
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stdout.flush()
        stolen = steal_percent(steal_before, steal_ticks(), time.monotonic() - wall_before)
        _print(results, args, log, out)
        if stolen is not None:
            print(
                f"the hypervisor stole {stolen:.0f}% of the machine's CPU time during the run",
                file=out,
            )
        if args.json:
            args.json.write_text(json.dumps({"machine": describe(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
