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

from nginx_support import (  # this directory, on the path as pytest puts it (prepend mode)
    NginxProxy,
    RedisServer,
    launch_services,
    nginx_binary,
    redis_server_binary,
    unavailable,
)
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


# Rate-limit cluster tests: nginx in front of several services, and a private Redis.
# Module-scoped, so that several tests can read one run of a cluster that costs
# seconds to start; what they start is stopped when the module's tests are done.


@pytest.fixture(scope="module")
def nginx_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., NginxProxy]]:
    """Start Debian's nginx in front of the given ports on 127.0.0.1.

    A missing nginx fails in CI (``.ci/run`` installs the package) and skips elsewhere.
    """
    binary = nginx_binary()
    if binary is None:
        unavailable("nginx", "not on PATH (apt-get install nginx)")
    assert binary is not None
    started: list[NginxProxy] = []

    def start(upstreams: list[int]) -> NginxProxy:
        proxy = NginxProxy(binary, tmp_path_factory.mktemp("nginx"), upstreams)
        started.append(proxy)
        proxy.wait_until_listening()
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture(scope="module")
def service_group(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., list[ServedProcess]]]:
    """Start N `bastion serve APP` processes at once with JSON logs and only ``env``."""
    started: list[ServedProcess] = []

    def start(count: int, app: str, env: dict[str, str]) -> list[ServedProcess]:
        services = launch_services(count, app, env, tmp_path_factory.mktemp("services"))
        started.extend(services)
        for served in services:
            served.wait_until_ready()
        return services

    yield start
    for served in started:
        served.kill()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], RedisServer]]:
    """Start a ``redis-server`` of the test's own on a free port, which it may kill."""
    binary = redis_server_binary()
    if binary is None:
        unavailable("redis-server", "not on PATH (apt-get install redis-server)")
    assert binary is not None
    started: list[RedisServer] = []

    def start() -> RedisServer:
        server = RedisServer(binary, tmp_path_factory.mktemp("redis"))
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()
