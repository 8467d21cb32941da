"""The machine and versions a figure was measured on, printed with every figure."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("bastion", "uvicorn", "starlette", "fastapi", "uvloop", "httptools", "orjson")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe(**extra: str) -> dict[str, Any]:
    """Return the versions and machine facts, plus any ``extra`` (such as the wrk version)."""
    return {
        "python": platform.python_version(),
        **{package: _version(package) for package in PACKAGES},
        **extra,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
    }


def format_description(facts: dict[str, Any]) -> str:
    """Return the facts as two readable lines."""
    versions = ", ".join(
        f"{key} {value}" for key, value in facts.items() if key not in {"cpu", "cores", "os"}
    )
    return f"versions: {versions}\nmachine: {facts['cpu']}, {facts['cores']} cores, {facts['os']}"


def steal_ticks() -> int | None:
    """Return the CPU ticks the hypervisor has stolen from this machine so far (Linux)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8])
    except (OSError, IndexError, ValueError):
        return None


def steal_percent(before: int | None, after: int | None, seconds: float) -> float | None:
    """Return the share of the machine's CPU time stolen between two ``steal_ticks``."""
    if before is None or after is None or seconds <= 0:
        return None
    return 100 * (after - before) / (os.sysconf("SC_CLK_TCK") * seconds * (os.cpu_count() or 1))
