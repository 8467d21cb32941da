"""Fixtures for shutdown tests; the helpers themselves are in shutdown_support.py."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# pytest puts this directory on sys.path (tests/ has no __init__.py: "prepend" import mode).
from shutdown_support import ServedProcess, free_port


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[Callable[..., ServedProcess]]:
    """Start `bastion serve APP` (the drain test app by default) with the given options.

    The database is a fresh SQLite file; logs are JSON. Processes still running
    at the end of the test are killed.
    """
    started: list[ServedProcess] = []

    def start(
        *options: str,
        env: dict[str, str] | None = None,
        ready: bool = True,
        app: str = "tests.lifecycle.served_app:app",
    ) -> ServedProcess:
        port = free_port()
        environment = {
            **os.environ,
            "BASTION_DATABASE__URL": f"sqlite+aiosqlite:///{tmp_path / 'served.db'}",
            "BASTION_LOGGING__FORMAT": "json",
            **(env or {}),
        }
        logs = tmp_path / f"serve-{len(started)}"
        logs.mkdir()
        served = ServedProcess(
            [app, "--port", str(port), *options],
            environment,
            logs,
            port,
        )
        started.append(served)
        if ready:
            served.wait_until_ready()
        return served

    yield start
    for served in started:
        served.kill()
