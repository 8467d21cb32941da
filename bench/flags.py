"""Flag evaluations per second: bastion against Unleash's SDK and OpenFeature's in-memory provider.

One flag, the issue's: on for contexts whose ``environment`` is ``production`` or
``staging`` and whose ``country`` is one of three (two ``IN`` constraints), for 30% of
them by ``userId`` (Unleash's ``flexibleRollout``). Each variant evaluates it for
the same ``--contexts`` distinct users, cycled, ``--evaluations`` calls a round,
``--rounds`` rounds; the figure is the median round. In one run:

1. **bastion, FlagSet.is_enabled** with Unleash's context shape (a dict with
   ``properties``), the entry point the issue names.
2. **bastion, Flags.evaluate** with an :class:`EvaluationContext` (value, variant,
   reason and rule, counted by flag and reason), one context per user reused across
   calls, as within one request that asks for several flags.
   Then the same with a **new EvaluationContext each call** (one flag per request): no
   target, since that figure includes building the context.
3. **UnleashClient** (the official Python SDK, its Rust engine), offline: bootstrapped
   from a file with ``FileCache.bootstrap_from_file``, never initialised, so it
   neither fetches, registers nor sends metrics. The baseline.
4. **openfeature-sdk's InMemoryProvider** through ``client.get_boolean_value``, its
   ``context_evaluator`` doing the same two checks and the same MurmurHash3 bucket.

Then a cross-check: bastion and UnleashClient must agree on ``is_enabled`` for 10,000
random users (and on the variant of a three-way split for the same users); the
mismatches are printed and the run exits 1 if there is any.

The issue's target: at least 500,000 evaluations per second from one process; the
verdict lines say which measurement each applies to.

Usage:
    .venv/bin/python bench/flags.py [--evaluations 200000] [--rounds 7] [--contexts 1000]
        [--check 10000]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mmh3
from _machine import describe, format_description, steal_percent, steal_ticks
from openfeature import api
from openfeature.evaluation_context import EvaluationContext as OpenFeatureContext
from openfeature.flag_evaluation import FlagResolutionDetails, Reason
from openfeature.provider.in_memory_provider import InMemoryFlag, InMemoryProvider
from UnleashClient import UnleashClient
from UnleashClient.cache import FileCache

from bastion.flags import EvaluationContext, Flags, FlagSet

TARGET = 500_000
"""The issue's target, evaluations per second from one process."""
IS_ENABLED = "bastion FlagSet.is_enabled (Unleash context)"
EVALUATE = "bastion Flags.evaluate (EvaluationContext reused)"
PER_REQUEST = "bastion Flags.evaluate (new EvaluationContext each)"
KEY = "checkout.v2"
SPLIT_KEY = "checkout.theme"
ENVIRONMENTS = ("production", "staging")
COUNTRIES = ("NO", "SE", "DK")
PERCENTAGE = 30
STATE: dict[str, Any] = {
    "version": 2,
    "features": [
        {
            "name": KEY,
            "enabled": True,
            "strategies": [
                {
                    "name": "flexibleRollout",
                    "parameters": {
                        "rollout": str(PERCENTAGE),
                        "stickiness": "userId",
                        "groupId": KEY,
                    },
                    "constraints": [
                        {
                            "contextName": "environment",
                            "operator": "IN",
                            "values": list(ENVIRONMENTS),
                        },
                        {"contextName": "country", "operator": "IN", "values": list(COUNTRIES)},
                    ],
                }
            ],
        },
        {
            "name": SPLIT_KEY,
            "enabled": True,
            "strategies": [{"name": "default"}],
            "variants": [
                {"name": "red", "weight": 200, "stickiness": "userId"},
                {"name": "green", "weight": 300, "stickiness": "userId"},
                {"name": "blue", "weight": 500, "stickiness": "userId"},
            ],
        },
    ],
}


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _contexts(count: int, seed: int) -> list[dict[str, Any]]:
    """Unleash-shaped contexts: random users, environments and countries (some outside)."""
    rng = random.Random(seed)
    return [
        {
            "userId": f"user-{rng.getrandbits(48):x}",
            "environment": rng.choice((*ENVIRONMENTS, "development")),
            "properties": {"country": rng.choice((*COUNTRIES, "FI"))},
        }
        for _ in range(count)
    ]


def _rate(
    call: Callable[[Any], object], contexts: list[Any], evaluations: int, rounds: int
) -> float:
    """Median evaluations per second over ``rounds`` rounds of ``evaluations`` calls."""
    repeats = max(1, evaluations // len(contexts))
    for context in contexts[:200]:  # warm-up: first-use paths
        call(context)
    rates = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeats):
            for context in contexts:
                call(context)
        rates.append(repeats * len(contexts) / (time.perf_counter() - started))
    return statistics.median(rates)


def _unleash_client(directory: str) -> Any:
    bootstrap = Path(directory) / "bootstrap.json"
    bootstrap.write_text(json.dumps(STATE))
    cache = FileCache("bastion-bench", directory=directory)
    cache.bootstrap_from_file(bootstrap)
    # Never initialised: a bootstrapped client evaluates from the file without fetching,
    # registering, sending metrics or starting its scheduler.
    return UnleashClient(
        url="http://127.0.0.1:9",
        app_name="bastion-bench",
        environment="production",
        disable_metrics=True,
        disable_registration=True,
        cache=cache,
        cache_directory=directory,
    )


def _openfeature_client() -> Any:
    prefix = f"{KEY}:"
    environments, countries = frozenset(ENVIRONMENTS), frozenset(COUNTRIES)

    def evaluate(flag: Any, context: Any) -> Any:
        attributes = context.attributes
        user = context.targeting_key
        on = bool(
            user
            and attributes.get("environment") in environments
            and attributes.get("country") in countries
            and mmh3.hash(prefix + user, 0, signed=False) % 100 + 1 <= PERCENTAGE
        )
        variant = "on" if on else "off"
        return FlagResolutionDetails(
            value=flag.variants[variant], variant=variant, reason=Reason.TARGETING_MATCH
        )

    flag = InMemoryFlag("off", {"on": True, "off": False}, context_evaluator=evaluate)
    api.set_provider(InMemoryProvider({KEY: flag}))
    return api.get_client()


def _cross_check(
    flag_set: FlagSet, unleash: Any, of_client: Any, count: int
) -> tuple[list[str], int]:
    """Where bastion and UnleashClient (and the OpenFeature evaluator) disagree, and how
    many contexts the flag was on for."""
    mismatches = []
    on = 0
    for context in _contexts(count, seed=20261207):
        ours = flag_set.is_enabled(KEY, context)
        on += ours
        theirs = unleash.is_enabled(KEY, context)
        of_context = OpenFeatureContext(
            targeting_key=context["userId"],
            attributes={"environment": context["environment"], **context["properties"]},
        )
        openfeature = of_client.get_boolean_value(KEY, False, of_context)
        if not ours == theirs == openfeature:
            mismatches.append(
                f"is_enabled {context}: bastion {ours}, UnleashClient {theirs},"
                f" OpenFeature evaluator {openfeature}"
            )
        ours_variant = flag_set.variant(SPLIT_KEY, context)["name"]
        theirs_variant = unleash.get_variant(SPLIT_KEY, context)["name"]
        if ours_variant != theirs_variant:
            mismatches.append(
                f"variant {context}: bastion {ours_variant}, UnleashClient {theirs_variant}"
            )
    return mismatches, on


def run(args: argparse.Namespace) -> int:
    contexts = _contexts(args.contexts, seed=7)
    bastion_contexts = [
        EvaluationContext(
            user_id=c["userId"], environment=c["environment"], properties=c["properties"]
        )
        for c in contexts
    ]
    flag_set = FlagSet.from_unleash(STATE)
    flags = Flags(flag_set)
    of_client = _openfeature_client()
    of_contexts = [
        OpenFeatureContext(
            targeting_key=c["userId"],
            attributes={"environment": c["environment"], **c["properties"]},
        )
        for c in contexts
    ]
    load_before = os.getloadavg()[0]
    steal_before, wall_before = steal_ticks(), time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bastion-bench-flags-") as directory:
        unleash = _unleash_client(directory)
        is_enabled = flag_set.is_enabled
        evaluate = flags.evaluate
        figures = {
            IS_ENABLED: _rate(
                lambda c: is_enabled(KEY, c), contexts, args.evaluations, args.rounds
            ),
            EVALUATE: _rate(
                lambda c: evaluate(KEY, c), bastion_contexts, args.evaluations, args.rounds
            ),
            # What one evaluation per request costs: the context is built for each call.
            PER_REQUEST: _rate(
                lambda c: evaluate(
                    KEY,
                    EvaluationContext(
                        user_id=c["userId"],
                        environment=c["environment"],
                        properties=c["properties"],
                    ),
                ),
                contexts,
                args.evaluations,
                args.rounds,
            ),
            "UnleashClient.is_enabled (offline, bootstrapped)": _rate(
                lambda c: unleash.is_enabled(KEY, c),
                contexts,
                args.evaluations // 10,
                args.rounds,
            ),
            "openfeature-sdk InMemoryProvider (get_boolean_value)": _rate(
                lambda c: of_client.get_boolean_value(KEY, False, c),
                of_contexts,
                args.evaluations // 10,
                args.rounds,
            ),
        }
        mismatches, on = _cross_check(flag_set, unleash, of_client, args.check)
    stolen = steal_percent(steal_before, steal_ticks(), time.monotonic() - wall_before)

    print(
        format_description(
            describe(
                mmh3=_version("mmh3"),
                UnleashClient=_version("UnleashClient"),
                yggdrasil_engine=_version("yggdrasil-engine"),
                openfeature_sdk=_version("openfeature-sdk"),
            )
        )
    )
    print()
    print(
        f"One flag, two IN constraints and a {PERCENTAGE}% rollout by userId; {len(contexts)}"
        f" distinct contexts cycled; median of {args.rounds} rounds:"
    )
    unleash_rate = figures["UnleashClient.is_enabled (offline, bootstrapped)"]
    of_rate = figures["openfeature-sdk InMemoryProvider (get_boolean_value)"]
    print(f"  {'variant':<54}{'evals/s':>12}{'µs/eval':>10}{'x Unleash':>11}{'x OpenFeature':>15}")
    for name, rate in figures.items():
        print(
            f"  {name:<54}{rate:>12,.0f}{1e6 / rate:>10.2f}"
            f"{rate / unleash_rate:>11.1f}{rate / of_rate:>15.1f}"
        )
    print()
    # The target is the evaluation's: measured with a context built once and reused (as a
    # request does for all the flags it evaluates). The per-request figure adds building
    # the context, so it gets no verdict, only its figure.
    for name, what in (
        (IS_ENABLED, "FlagSet.is_enabled, Unleash-shaped dict context"),
        (EVALUATE, "Flags.evaluate, one EvaluationContext reused as within one request"),
    ):
        verdict = "met" if figures[name] >= TARGET else "NOT MET"
        print(
            f"  target >= {TARGET:,} evaluations/s for {what}: {verdict}"
            f" ({figures[name]:,.0f}/s, {figures[name] / TARGET:.2f}x the target)"
        )
    per_request = figures[PER_REQUEST]
    print(
        f"  Flags.evaluate with a new EvaluationContext each call: {per_request:,.0f}/s"
        f" ({per_request / TARGET:.2f}x the target figure): no target (includes building"
        " the context)"
    )
    print()
    print(
        f"Cross-check on {args.check:,} random users: bastion and UnleashClient"
        f" (is_enabled, and the variant of a 20/30/50 split): {len(mismatches)} mismatches"
        f" (the flag was on for {on:,} of them)"
    )
    for line in mismatches[:20]:
        print(f"  {line}")
    # Other processes' CPU use moves every figure here: say how busy the machine was.
    print(f"load average (1 min) before the run {load_before:.2f}, after {os.getloadavg()[0]:.2f}")
    if stolen:
        print(f"the hypervisor stole {stolen:.0f}% of the machine's CPU time during the run")
    return 1 if mismatches else 0


def main() -> int:
    # The SDKs log their start-up (and UnleashClient its "not initialised" notices).
    logging.getLogger("UnleashClient").setLevel(logging.CRITICAL)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluations", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--contexts", type=int, default=1000)
    parser.add_argument("--check", type=int, default=10_000)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
