"""Cost of a call through a resilience pipeline, against a plain await of the same coroutine.

Every variant awaits the same coroutine (``async def answer(): return 42``), the
cheapest possible dependency, so what is measured is the pipeline's own
Python: the figure the issue's target (under 10 µs added per successful call)
is about. Pipelines come from a ``Resilience`` registry on the memory backend
(``resilience.store_url`` unset, no Redis), registered as ``http`` dependencies:
the full default order (fallback, total timeout 30 s, retry x3 with a budget,
circuit breaker, bulkhead 100 + queue 100, attempt timeout 10 s), the circuit
closed, every call a success.

The variants are measured in interleaved rounds (the order rotates each round)
on CPU time of the running thread, the event loop yielding every ``--batch``
calls like a server between batches of ready requests; the figure is the
median of rounds and the difference the median of per-round paired
differences against ``plain``, so the drift of a shared machine mostly cancels.

With ``--redis`` reachable, it also times one refresh of the shared circuit
state (one HGETALL of the circuits hash, parsed and applied to the breakers),
which each instance makes every ``state_refresh_interval`` (1 s) whatever its
traffic: wall time (a loopback round trip included) and CPU time.

Usage:
    .venv/bin/python bench/resilience.py [--calls 2000] [--rounds 30] [--batch 16]
        [--loop uvloop|asyncio] [--redis redis://127.0.0.1:6379/0] [--profile VARIANT]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import logging
import pstats
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import structlog
from _machine import describe, format_description, steal_percent, steal_ticks
from tenacity import AsyncRetrying, stop_after_attempt

from bastion.resilience import Resilience
from bastion.resilience._timeout import Alarms
from bastion.settings import ResilienceSettings

Variant = Callable[[], Awaitable[Any]]


async def answer() -> int:
    return 42


def _settings(**dependencies: dict[str, Any]) -> ResilienceSettings:
    return ResilienceSettings.model_validate({"dependencies": dependencies})


def _variants() -> dict[str, tuple[Variant, str]]:
    """Each variant: what one call is, and what it shows."""
    registry = Resilience(
        _settings(
            llm={"kind": "http"},
            no_bulkhead={"kind": "http", "max_concurrent": 0},
            no_timeout={"kind": "http", "timeout": 0, "total_timeout": 0},
            database={"kind": "database"},
            bare={
                "kind": "custom",
                "timeout": 0,
                "total_timeout": 0,
                "retries": 0,
                "circuit": "",
            },
        )
    )
    llm = registry.pipeline("llm")
    no_bulkhead = registry.pipeline("no_bulkhead")
    no_timeout = registry.pipeline("no_timeout")
    database = registry.pipeline("database")
    bare = registry.pipeline("bare")
    decorated = llm(answer)

    async def fallback(_exc: BaseException) -> int:
        return 0

    with_fallback = llm.with_options(fallback=fallback)

    async def block() -> int:
        async with llm:
            return await answer()

    async def per_call_options() -> int:
        return await llm.with_options(idempotent=False).call(answer)

    shared_tenacity = AsyncRetrying(stop=stop_after_attempt(4))

    async def tenacity_call() -> int:
        return await shared_tenacity(answer)  # type: ignore[no-any-return]

    async def asyncio_timeout() -> int:
        async with asyncio.timeout(10):
            return await answer()

    alarms: Alarms | None = None

    class _Target:
        def expire(self) -> None:
            raise AssertionError("a 10 s deadline passed in a benchmark")

    target = _Target()

    async def loop_timer() -> int:
        loop = asyncio.get_running_loop()
        handle = loop.call_at(loop.time() + 10, target.expire)
        try:
            return await answer()
        finally:
            handle.cancel()

    async def alarm_timer() -> int:
        nonlocal alarms
        loop = asyncio.get_running_loop()
        if alarms is None:
            alarms = Alarms(loop)
        alarm = alarms.add(loop.time() + 10, target)
        try:
            return await answer()
        finally:
            alarms.remove(alarm)

    return {
        "plain": (answer, "await answer()"),
        "pipeline": (lambda: llm.call(answer), "http defaults: every strategy on"),
        "pipeline, no bulkhead": (lambda: no_bulkhead.call(answer), "http, max_concurrent 0"),
        "pipeline, no timeouts": (lambda: no_timeout.call(answer), "http, both timeouts 0"),
        "pipeline, database": (lambda: database.call(answer), "database defaults (no bulkhead)"),
        "pipeline, nothing on": (lambda: bare.call(answer), "no timeout, retry, circuit, bulkhead"),
        "decorator": (decorated, "@llm on answer"),
        "with fallback": (lambda: with_fallback.call(answer), "llm.with_options(fallback=...)"),
        "options per call": (per_call_options, "llm.with_options(...) made at each call"),
        "async with": (block, "async with llm: (one guarded attempt)"),
        "tenacity (scale)": (tenacity_call, "a shared AsyncRetrying, success path"),
        "asyncio.timeout (scale)": (asyncio_timeout, "async with asyncio.timeout(10)"),
        "timer: loop.call_at": (loop_timer, "one TimerHandle per call, cancelled"),
        "timer: Alarms": (alarm_timer, "the pipeline's attempt deadlines"),
    }


async def _run(variant: Variant, calls: int, batch: int) -> float:
    """Make ``calls`` calls; return the mean CPU µs per call."""
    sleep = asyncio.sleep
    gc.collect()
    started = time.thread_time_ns()
    for i in range(calls):
        await variant()
        if i % batch == 0:
            await sleep(0)
    return (time.thread_time_ns() - started) / calls / 1000


async def _measure(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    variants = _variants()
    names = list(variants)
    for name in names:  # warm-up: first-use paths, metric children, the alarms' queue
        await _run(variants[name][0], 2000, args.batch)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_no in range(args.rounds):
        order = names[round_no % len(names) :] + names[: round_no % len(names)]
        for name in order:
            samples[name].append(await _run(variants[name][0], args.calls, args.batch))
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        await _run(variants[args.profile][0], args.calls * 10, args.batch)
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        print(text.getvalue())
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        paired = [mine - base for mine, base in zip(samples[name], samples["plain"], strict=True)]
        results[name] = {
            "us": statistics.median(samples[name]),
            "added_us": statistics.median(paired),
            "what": variants[name][1],
        }
    return results


async def _refresh(url: str, circuits: int, repeat: int) -> tuple[float, float] | None:
    """Time one shared-state refresh of ``circuits`` open circuits: (wall µs, CPU µs), medians.

    One registry opens its circuits (published to Redis); another, as a second
    instance would, re-reads them.
    """
    import redis.asyncio as aioredis  # noqa: PLC0415 -- only with --redis

    # Opening 100 circuits at once publishes 100 transitions concurrently, one pooled
    # connection each: more than redis-py's default pool of 100 with the subscriber.
    client = aioredis.Redis.from_url(
        url, socket_timeout=2, socket_connect_timeout=2, max_connections=1000
    )
    prefix = f"bastion-bench:{secrets.token_hex(4)}:"
    try:
        await client.ping()
    except Exception as exc:  # noqa: BLE001 -- any failure: say so, measure the rest
        print(f"Redis at {url} unreachable ({type(exc).__name__}): refresh not measured")
        await client.aclose()
        return None
    settings = _settings(**{f"dependency{n}": {"kind": "http"} for n in range(circuits)})
    writer = Resilience(settings, redis=client, key_prefix=prefix)
    reader = Resilience(settings, redis=client, key_prefix=prefix)
    try:
        await writer.start()
        for name in settings.dependencies:
            breaker = writer.breaker(name)
            for _ in range(5):
                breaker.record_failure(0.001)  # five in a row: open, published
        # Publication runs in background tasks: give it up to 5 s.
        for _ in range(500):
            if await client.hlen(f"{prefix}circuits") >= circuits:
                break
            await asyncio.sleep(0.01)
        else:
            found = await client.hlen(f"{prefix}circuits")
            print(f"only {found} of {circuits} circuits reached the shared hash; timed as is")
        await reader.start()  # applies the transitions; later refreshes find nothing new
        walls, cpus = [], []
        for _ in range(repeat):
            wall, cpu = time.perf_counter_ns(), time.thread_time_ns()
            await reader.refresh()
            cpus.append((time.thread_time_ns() - cpu) / 1000)
            walls.append((time.perf_counter_ns() - wall) / 1000)
        return statistics.median(walls), statistics.median(cpus)
    finally:
        await writer.stop()
        await reader.stop()
        await client.delete(f"{prefix}circuits")
        await client.aclose()


async def _main(args: argparse.Namespace) -> None:
    steal_before, wall_before = steal_ticks(), time.monotonic()
    results = await _measure(args)
    stolen = steal_percent(steal_before, steal_ticks(), time.monotonic() - wall_before)
    refreshes = {}
    if args.redis:
        for circuits in (3, 100):
            refreshes[circuits] = await _refresh(args.redis, circuits, args.refreshes)

    print(format_description(describe(loop=args.loop, tenacity=_version("tenacity"))))
    print(
        f"CPU µs per call, median of {args.rounds} interleaved rounds of {args.calls} calls, "
        f"loop yielded every {args.batch} calls; added = median of paired differences to plain"
    )
    print(f"{'variant':<26}{'µs/call':>9}{'added µs':>10}{'ratio':>8}   what")
    base = results["plain"]["us"]
    for name, result in results.items():
        print(
            f"{name:<26}{result['us']:>9.2f}{result['added_us']:>+10.2f}"
            f"{result['us'] / base:>7.1f}x   {result['what']}"
        )
    added = results["pipeline"]["added_us"]
    verdict = "met" if added < 10 else "NOT met"
    print(
        f"target: under 10 µs added per successful call (full pipeline): {added:.2f} µs, {verdict}"
    )
    for circuits, figures in refreshes.items():
        if figures is not None:
            wall, cpu = figures
            print(
                f"shared-state refresh, {circuits} circuits: {wall:.0f} µs wall "
                f"(a loopback round trip included), {cpu:.0f} µs CPU; median of {args.refreshes}"
            )
    if stolen is not None:
        print(f"the hypervisor stole {stolen:.0f}% of the machine's CPU time during the run")


def _version(package: str) -> str:
    from importlib import metadata  # noqa: PLC0415 -- only for the header

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def main() -> int:
    """Run the benchmark and print its figures."""
    # The breakers' transition lines (the refresh opens circuits) would drown the figures.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per variant per round")
    parser.add_argument("--rounds", type=int, default=30, help="rounds; medians are reported")
    parser.add_argument("--batch", type=int, default=16, help="calls per event-loop turn")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument(
        "--redis",
        default="redis://127.0.0.1:6379/0",
        help="Redis for the shared-state refresh; empty to skip",
    )
    parser.add_argument("--refreshes", type=int, default=200, help="refreshes timed")
    parser.add_argument("--profile", metavar="VARIANT", help="cProfile one variant afterwards")
    args = parser.parse_args()
    runner: Callable[[Any], Any] = asyncio.run
    if args.loop == "uvloop":
        try:
            import uvloop  # noqa: PLC0415 -- optional, as in the server

            runner = uvloop.run
        except ImportError:
            print("uvloop is not installed: running on asyncio's loop")
            args.loop = "asyncio"
    runner(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
