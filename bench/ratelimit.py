"""Rate-limit decisions per second: bastion's stores against ``limits`` and a raw EVALSHA loop.

All cases run in this one process on one event loop, one after the other, each
for ``--duration`` seconds after a short warm-up; with ``--rounds`` above 1 the
cases are interleaved (the order rotates each round) and the median is
printed. Every figure is printed with its ratio to its baseline from the same
run:

- raw EVALSHA: redis-py's ``await client.evalsha(...)`` of bastion's own
  ``decide.lua`` (one token-bucket rule), one call at a time: the physical limit
  of one round trip from Python, the lone caller's baseline;
- ``limits`` (its async Redis storage on both clients it offers: ``coredis``,
  its default, and redis-py; and its async memory storage), at the same
  concurrency, on the same keys and limit; each bastion Redis figure is
  compared with the faster of the two clients. The algorithm families
  compared: bastion's token bucket (GCRA) with ``limits``' fixed window (the
  one-counter algorithm ``limits`` has; GCRA it has not), bastion's sliding
  window counter with ``limits``' sliding window counter (the same algorithm),
  bastion's sliding log with ``limits``' moving window (both exact logs).

Concurrency means that many coroutines deciding in a loop; decisions spread
over ``--keys`` keys under a limit high enough that nearly all are admitted
(admissions write; rejections would only read). The targets of issue 6 are
printed as met or not, never asserted.

Usage:
    .venv/bin/python bench/ratelimit.py [--duration 1] [--rounds 3] [--concurrency 64]
        [--redis redis://127.0.0.1:6379/0] [--loop uvloop|asyncio] [--only a,b]
        [--limits-implementations coredis,redispy] [--connections 2]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import describe, format_description, steal_percent, steal_ticks

from bastion.ratelimit._memory import MemoryStore
from bastion.ratelimit._redis import DECIDE, RedisStore
from bastion.ratelimit._rules import build_rules
from bastion.ratelimit._scripts import ScriptRunner

LIMIT = "100000/second"
# How case names call limits' Redis clients: coredis is what limits uses by default.
_LIMITS_CLIENT = {"coredis": "redis", "redispy": "redis-py"}
Decide = Callable[[int], Awaitable[Any]]


def _version(package: str) -> str:
    from importlib import metadata  # noqa: PLC0415 -- only for the header

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


async def _throughput(decide: Decide, concurrency: int, duration: float) -> float:
    """Run ``concurrency`` coroutines deciding in a loop for ``duration`` s; return decisions/s."""
    done = 0
    clock = time.perf_counter
    sleep = asyncio.sleep

    async def worker(offset: int) -> None:
        # Each worker watches the clock itself and yields every 64 decisions: a
        # store that never suspends (memory) would otherwise starve the others.
        nonlocal done
        n = offset
        while clock() < deadline:
            await decide(n)
            n += concurrency
            if n % (64 * concurrency) < concurrency:
                await sleep(0)
        done += (n - offset) // concurrency

    gc.collect()
    started, cpu = clock(), time.thread_time()
    deadline = started + duration
    tasks = [asyncio.ensure_future(worker(offset)) for offset in range(concurrency)]
    await asyncio.gather(*tasks)
    _CPU.append((time.thread_time() - cpu) / max(done, 1))
    return done / (clock() - started)


# CPU seconds of this thread per decision of the last run (steadier than a rate on a
# shared machine: what one decision costs the process, whatever the wait for Redis).
_CPU: list[float] = []


def _sync_throughput(decide: Callable[[int], Any], duration: float) -> float:
    """Call ``decide`` in a plain loop for ``duration`` s; return calls/s."""
    gc.collect()
    count = 0
    started, cpu = time.perf_counter(), time.thread_time()
    deadline = started + duration
    while True:
        for n in range(count, count + 10_000):
            decide(n)
        count += 10_000
        if time.perf_counter() >= deadline:
            break
    _CPU.append((time.thread_time() - cpu) / count)
    return count / (time.perf_counter() - started)


class Cases:
    """Every case: a name, what it is, how to run it; and the clients to close."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.keys = args.keys
        self.prefix = f"bastion-bench:{secrets.token_hex(4)}:"
        self.cases: dict[str, tuple[str, Callable[[float], Awaitable[float]]]] = {}
        self._closers: list[Callable[[], Awaitable[Any]]] = []
        self.redis_ok = False

    def add(self, name: str, what: str, run: Callable[[float], Awaitable[float]]) -> None:
        if not self.args.only or name in self.args.only:
            self.cases[name] = (what, run)

    async def build(self) -> None:
        limits_cases = self._memory()
        await self._redis(*limits_cases)

    def _memory(self) -> tuple[Any, dict[str, Any], Any]:
        args = self.args
        keys = self.keys
        c = args.concurrency
        names = [f"k{n}" for n in range(keys)]
        memory = MemoryStore()
        tb = build_rules(LIMIT, "token_bucket", max_log_limit=10**6)
        decide_now = memory.decide_now

        async def memory_sync(duration: float) -> float:
            return _sync_throughput(lambda n: decide_now(names[n % keys], tb), duration)

        async def memory_async(duration: float) -> float:
            return await _throughput(lambda n: memory.decide(names[n % keys], tb), c, duration)

        self.add("memory tb sync", "MemoryStore.decide_now, token bucket, a loop", memory_sync)
        self.add(
            "memory tb c64", f"await MemoryStore.decide, token bucket, {c} coroutines", memory_async
        )

        from limits import parse  # noqa: PLC0415 -- the baseline library
        from limits.aio import storage as limits_storage  # noqa: PLC0415
        from limits.aio import strategies  # noqa: PLC0415

        item = parse(LIMIT)
        limit_names = {
            "fixed": strategies.FixedWindowRateLimiter,
            "swc": strategies.SlidingWindowCounterRateLimiter,
            "moving": strategies.MovingWindowRateLimiter,
        }
        limits_memory = limits_storage.MemoryStorage()
        for short, strategy in limit_names.items():
            limiter = strategy(limits_memory)

            async def run(duration: float, limiter: Any = limiter) -> float:
                return await _throughput(
                    lambda n: limiter.hit(item, "bench", names[n % keys]), c, duration
                )

            self.add(f"limits memory {short} c64", f"limits {strategy.__name__}, memory", run)
        return item, limit_names, limits_storage

    async def _redis(self, item: Any, limit_names: dict[str, Any], limits_storage: Any) -> None:
        args = self.args
        keys = self.keys
        c = args.concurrency
        names = [f"k{n}" for n in range(keys)]
        if not args.redis:
            return
        import redis.asyncio as aioredis  # noqa: PLC0415 -- only with --redis

        client = aioredis.Redis.from_url(args.redis)
        try:
            await client.ping()
        except Exception as exc:  # noqa: BLE001 -- any failure: say so, measure the rest
            print(f"Redis at {args.redis} unreachable ({type(exc).__name__}): Redis not measured")
            await client.aclose()
            return
        self.redis_ok = True
        self._closers.append(client.aclose)
        runner = ScriptRunner(client, timeout=1.0, connections=args.connections)
        self._closers.append(runner.close)
        store = RedisStore(client, key_prefix=self.prefix, timeout=1.0, runner=runner)
        rules = {
            algorithm: build_rules(LIMIT, algorithm, max_log_limit=10**6)
            for algorithm in ("token_bucket", "sliding_window", "sliding_log")
        }
        plan_args = store._plan(rules["token_bucket"]).args  # the arguments the store sends
        raw_keys = [store.key(name, rules["token_bucket"][0]) for name in names]
        sha = DECIDE.sha
        await client.script_load(DECIDE.source)

        async def raw(duration: float) -> float:
            return await _throughput(
                lambda n: client.evalsha(sha, 1, raw_keys[n % keys], "", 1, "", *plan_args),
                1,
                duration,
            )

        self.add("raw EVALSHA lone", "redis-py client.evalsha(decide.lua), one at a time", raw)

        async def lone(duration: float) -> float:
            tb_rules = rules["token_bucket"]
            return await _throughput(lambda n: store.decide(names[n % keys], tb_rules), 1, duration)

        self.add("redis tb lone", "RedisStore.decide, token bucket, one at a time", lone)
        for algorithm, short in (
            ("token_bucket", "tb"),
            ("sliding_window", "swc"),
            ("sliding_log", "log"),
        ):
            algorithm_rules = rules[algorithm]

            async def concurrent(duration: float, algorithm_rules: Any = algorithm_rules) -> float:
                return await _throughput(
                    lambda n: store.decide(names[n % keys], algorithm_rules), c, duration
                )

            self.add(
                f"redis {short} c64", f"RedisStore.decide, {algorithm}, {c} coroutines", concurrent
            )

        for implementation in args.limits_implementations:
            for short, strategy in limit_names.items():
                # A storage (and key prefix) per strategy: their keys would collide.
                limits_redis = limits_storage.RedisStorage(
                    "async+" + args.redis,
                    implementation=implementation,
                    key_prefix=f"{self.prefix}limits-{implementation}-{short}",
                )
                limiter = strategy(limits_redis)

                async def run_redis(duration: float, limiter: Any = limiter) -> float:
                    return await _throughput(
                        lambda n: limiter.hit(item, "bench", names[n % keys]), c, duration
                    )

                self.add(
                    f"limits {_LIMITS_CLIENT[implementation]} {short} c64",
                    f"limits {strategy.__name__}, async storage on {implementation}",
                    run_redis,
                )

        async def cleanup() -> None:
            async for key in client.scan_iter(match=self.prefix + "*", count=1000):
                await client.delete(key)

        self._closers.insert(0, cleanup)

    async def close(self) -> None:
        for close in self._closers:
            await close()


async def _main(args: argparse.Namespace) -> None:
    steal_before, wall_before = steal_ticks(), time.monotonic()
    cases = Cases(args)
    await cases.build()
    names = list(cases.cases)
    samples: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    try:
        for round_no in range(args.rounds):
            order = names[round_no % len(names) :] + names[: round_no % len(names)]
            for name in order:
                _, run = cases.cases[name]
                await run(min(0.5, args.duration / 4))  # warm-up: connections, scripts, caches
                samples[name].append(await run(args.duration))
                cpu[name].append(_CPU[-1])
    finally:
        await cases.close()
    stolen = steal_percent(steal_before, steal_ticks(), time.monotonic() - wall_before)
    rates = {name: statistics.median(values) for name, values in samples.items()}

    print(
        format_description(
            describe(
                loop=args.loop,
                redis=_version("redis"),
                hiredis=_version("hiredis"),
                limits=_version("limits"),
                coredis=_version("coredis"),
            )
        )
    )
    print(
        f"decisions/s, median of {args.rounds} round(s) of {args.duration:g} s per case; "
        f"limit {LIMIT} over {args.keys} keys; concurrency {args.concurrency}; "
        f"bastion Redis connections {args.connections}"
    )

    def fastest(*candidates: str) -> str | None:
        """The faster of limits' clients in this run: the stronger baseline."""
        measured = [name for name in candidates if name in rates]
        return max(measured, key=rates.__getitem__) if measured else None

    baselines = {
        "memory tb sync": "limits memory fixed c64",
        "memory tb c64": "limits memory fixed c64",
        "raw EVALSHA lone": None,
        "redis tb lone": "raw EVALSHA lone",
        "redis tb c64": fastest("limits redis fixed c64", "limits redis-py fixed c64"),
        "redis swc c64": fastest("limits redis swc c64", "limits redis-py swc c64"),
        "redis log c64": fastest("limits redis moving c64", "limits redis-py moving c64"),
    }
    cpu_us = {name: statistics.median(values) * 1e6 for name, values in cpu.items()}
    print(f"{'case':<26}{'decisions/s':>13}{'ratio':>9}{'CPU µs':>9}  {'to':<28}what")
    for name in names:
        base = baselines.get(name)
        ratio = f"{rates[name] / rates[base]:>8.2f}x" if base in rates else f"{'':>9}"
        print(
            f"{name:<26}{rates[name]:>13,.0f}{ratio}{cpu_us[name]:>9.1f}  {base or '':<28}"
            f"{cases.cases[name][0]}"
        )
    print("(CPU µs: this process's CPU time per decision, Redis's own not included)")

    def target(label: str, value: float | None, goal: float, unit: str) -> None:
        if value is None:
            print(f"target: {label}: not measured")
            return
        verdict = "met" if value >= goal else "NOT met"
        shown = f"{value:,.2f}" if unit == "x" else f"{value:,.0f}"
        wanted = f"{goal:g}" if unit == "x" else f"{goal:,.0f}"
        print(f"target: {label} >= {wanted}{unit}: {shown}{unit}, {verdict}")

    def ratio(name: str, base: str) -> float | None:
        return rates[name] / rates[base] if name in rates and base in rates else None

    target("lone caller / raw EVALSHA", ratio("redis tb lone", "raw EVALSHA lone"), 0.8, "x")
    for case, family in (
        ("redis swc c64", "sliding window counter"),
        ("redis tb c64", "fixed window"),
        ("redis log c64", "moving window"),
    ):
        base = baselines[case]
        target(
            f"{case} / {base} ({family})",
            ratio(case, base) if base else None,
            3,
            "x",
        )
    target("memory token bucket decisions/s", rates.get("memory tb sync"), 1_000_000, "/s")
    if stolen is not None:
        print(f"the hypervisor stole {stolen:.0f}% of the machine's CPU time during the run")


def main() -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=1.0, help="seconds per case and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument("--concurrency", type=int, default=64, help="coroutines per case")
    parser.add_argument("--keys", type=int, default=1024, help="distinct keys decided on")
    parser.add_argument("--connections", type=int, default=2, help="bastion's Redis connections")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="empty to skip")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument(
        "--limits-implementations",
        type=lambda text: [part for part in text.split(",") if part],
        default=["coredis", "redispy"],
        help="limits' Redis clients to measure: coredis (its default), redispy",
    )
    parser.add_argument(
        "--only",
        type=lambda text: set(text.split(",")),
        default=None,
        help="comma-separated case names",
    )
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
