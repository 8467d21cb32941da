"""The measured choices behind the request path's why-comments, side by side.

Each line times one alternative with ``timeit`` (best of several repeats, so a
busy machine inflates it least) and prints ns per call. The comments in
``bastion/context.py``, ``observability/_middleware.py`` and
``observability/_logging.py`` quote these figures; run this to check them on
another machine.

Usage:
    .venv/bin/python bench/choices.py [--number 200000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import time
import timeit
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import describe, format_description

from bastion.context import RequestContext, is_valid_request_id, new_request_id

_REGEX = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")


def _regex_valid(raw: bytes) -> bool:
    """The regex check the translate one replaced, as a function like it."""
    return _REGEX.fullmatch(raw) is not None


_LINE = b"x" * 290  # an access line is ~290 bytes


class _Clock:
    __slots__ = ("prefix", "second")

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""

    def now(self) -> str:
        second, nanoseconds = divmod(time.time_ns(), 1_000_000_000)
        if second != self.second:
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
            self.second = second
        return self.prefix + str(nanoseconds // 1000).zfill(6) + "Z"


def _line_dict(context: RequestContext, timestamp: str) -> bytes:
    return orjson.dumps(
        {
            "timestamp": timestamp,
            "level": "info",
            "event": "request",
            "logger": "bastion.access",
            "request_id": context.request_id,
            "trace_id": context.trace_id,
            "span_id": context.span_id,
            "method": context.method,
            "route": context.route,
            "status": 200,
            "duration_ms": 0.123,
            "client": context.client_ip,
        },
        option=orjson.OPT_APPEND_NEWLINE,
    )


_TEMPLATE = (
    b'{"timestamp":"%s","level":"info","event":"request","logger":"bastion.access",'
    b'"request_id":%s,"trace_id":%s,"span_id":%s,"method":%s,"route":%s,'
    b'"status":%d,"duration_ms":%a,"client":%s}\n'
)


def _line_template(context: RequestContext, timestamp: str) -> bytes:
    dumps = orjson.dumps
    return _TEMPLATE % (
        timestamp.encode(),
        dumps(context.request_id),
        dumps(context.trace_id),
        dumps(context.span_id),
        dumps(context.method),
        dumps(context.route),
        200,
        0.123,
        dumps(context.client_ip),
    )


def _cases(tmp: Path) -> list[tuple[str, str, dict[str, Any]]]:
    context = RequestContext("0123456789abcdef0123456789abcdef", "GET", "127.0.0.1")
    context.route = "/items/{item_id}"
    buffered = (tmp / "buffered.log").open("wb")
    raw = (tmp / "raw.log").open("wb", buffering=0)
    names = {
        "os": os,
        "uuid": uuid,
        "datetime": datetime,
        "UTC": UTC,
        "time": time,
        "context": context,
        "clock": _Clock(),
        "line_dict": _line_dict,
        "line_template": _line_template,
        "regex_valid": _regex_valid,
        "valid": is_valid_request_id,
        "new_request_id": new_request_id,
        "uuid_id": b"0b1e6bb2-8f33-4c4a-9d6c-0d8e4b2a7f10",
        "buffered": buffered,
        "raw": raw,
        "line": _LINE,
        "queue": collections.deque(),
        "started": time.perf_counter_ns(),
        "ts": "2026-01-01T00:00:00.123456Z",
    }
    return [
        ("request id: str(uuid.uuid4())", "str(uuid.uuid4())", names),
        ("request id: os.urandom(16).hex()", "os.urandom(16).hex()", names),
        ("request id: new_request_id() (Mersenne Twister)", "new_request_id()", names),
        ("validate id: compiled regex fullmatch", "regex_valid(uuid_id)", names),
        ("validate id: is_valid_request_id() (translate)", "valid(uuid_id)", names),
        ("timestamp: datetime.now(UTC).isoformat()", "datetime.now(UTC).isoformat()", names),
        ("timestamp: per-second prefix + microseconds", "clock.now()", names),
        (
            "duration: round(seconds * 1000, 3)",
            "round((time.perf_counter() - 1.0) * 1000, 3)",
            names,
        ),
        (
            "duration: integer ns // 1000 / 1000",
            "(time.perf_counter_ns() - started) // 1000 / 1000",
            names,
        ),
        ("access line: dict literal + orjson.dumps", "line_dict(context, ts)", names),
        ("access line: bytes template + orjson per field", "line_template(context, ts)", names),
        ("queue a line: BufferedWriter.write", "buffered.write(line)", names),
        ("queue a line: deque.append", "queue.append(line)", names),
        ("unbuffered write (a syscall per line)", "raw.write(line)", names),
    ]


def main() -> int:
    """Time every alternative and print ns per call."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=200_000, help="calls per repeat")
    parser.add_argument("--repeat", type=int, default=7, help="repeats; the best is kept")
    args = parser.parse_args()
    print(format_description(describe()))
    print(f"timeit best of {args.repeat} x {args.number} calls, ns per call")
    with tempfile.TemporaryDirectory(prefix="bastion-choices-") as tmp:
        for label, statement, names in _cases(Path(tmp)):
            number = args.number // 10 if "raw." in statement else args.number
            if "queue" in statement:
                names["queue"].clear()
            best = min(timeit.repeat(statement, globals=names, number=number, repeat=args.repeat))
            print(f"{label:<52}{best / number * 1e9:>8.0f}")
        names["buffered"].close()
        names["raw"].close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
