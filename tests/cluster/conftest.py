"""Fixtures for tests that run several real server processes."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# The process helpers are shared with the shutdown tests; tests/ has no __init__.py
# ("prepend" import mode), so their directory is put on the path as pytest does for it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lifecycle"))

from shutdown_support import ServedProcess, free_port  # needs the path above


@pytest.fixture
def serve_cluster(tmp_path: Path) -> Iterator[Callable[..., ServedProcess]]:
    """Start `bastion serve APP --workers N` with JSON logs; kill what is left at the end."""
    started: list[ServedProcess] = []

    def start(app: str, *options: str, env: dict[str, str] | None = None) -> ServedProcess:
        port = free_port()
        environment = {**os.environ}
        # The test's own environment must not choose the directory for the server.
        environment.pop("PROMETHEUS_MULTIPROC_DIR", None)
        environment.update({"BASTION_LOGGING__FORMAT": "json", **(env or {})})
        logs = tmp_path / f"serve-{len(started)}"
        logs.mkdir()
        served = ServedProcess([app, "--port", str(port), *options], environment, logs, port)
        started.append(served)
        served.wait_until_ready()
        return served

    yield start
    for served in started:
        served.kill()
