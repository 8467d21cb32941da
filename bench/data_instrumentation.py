"""CPU cost of bastion's statement listeners and pool meter, against the same engine bare.

Measured on a synchronous in-process SQLite engine, so neither a driver thread
nor the network drowns a few microseconds. Each variant runs ``--number``
statements (or checkouts) per round; rounds are interleaved and the best kept,
because the machine is shared. Prints µs per operation, the difference to the
bare engine and the ratio.

Usage:
    .venv/bin/python bench/data_instrumentation.py [--number 20000] [--rounds 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import QueuePool

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import describe, format_description

from bastion.data._instrumentation import (
    InstrumentedQueuePool,
    PoolMeter,
    QueryMeter,
)


class _SyncInstrumentedPool(InstrumentedQueuePool):
    # The same overrides over the thread-safe queue, so a synchronous engine drives them.
    _is_asyncio = False
    _queue_class = QueuePool._queue_class
    _dialect = QueuePool._dialect


def _statements(engine: Engine, number: int) -> float:
    statement = text("SELECT 1")
    with engine.connect() as connection:
        started = time.process_time()
        for _ in range(number):
            connection.execute(statement)
        return (time.process_time() - started) / number * 1e6


def _checkouts(engine: Engine, number: int) -> float:
    started = time.process_time()
    for _ in range(number):
        with engine.connect():
            pass
    return (time.process_time() - started) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=20)
    options = parser.parse_args()

    url = f"sqlite:///{tempfile.mkdtemp()}/bench.db"
    bare = create_engine(url, poolclass=QueuePool, pool_pre_ping=False)
    listened = create_engine(url, poolclass=QueuePool, pool_pre_ping=False)
    # QueryMeter.listen reads only .sync_engine, which a sync engine stands in for.
    QueryMeter("sqlite", slow_threshold=1.0).listen(SimpleNamespace(sync_engine=listened))
    metered = create_engine(url, poolclass=_SyncInstrumentedPool, pool_pre_ping=False)
    PoolMeter("bench", wait_warning=1.0).attach(metered.pool)

    measures: dict[str, Callable[[Engine, int], float]] = {
        "statement": _statements,
        "checkout": _checkouts,
    }
    variants = {"bare": bare, "query listeners": listened, "pool meter": metered}
    best: dict[tuple[str, str], float] = {}
    for _ in range(options.rounds):
        for variant, engine in variants.items():
            for measure, run in measures.items():
                figure = run(engine, options.number)
                best[variant, measure] = min(best.get((variant, measure), figure), figure)

    facts: dict[str, Any] = describe(number=str(options.number), rounds=str(options.rounds))
    print(format_description(facts))
    print("CPU µs per operation, best of interleaved rounds (ratio to bare)")
    for measure in measures:
        base = best["bare", measure]
        cells = [
            f"{variant} {best[variant, measure]:6.2f} ({best[variant, measure] / base:4.2f}x)"
            for variant in variants
        ]
        print(f"{measure:9}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
