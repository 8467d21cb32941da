"""Helpers for cluster tests behind a real nginx: the proxy, a private Redis, a load client.

The topology the rate-limit cluster tests build::

    client 127.0.0.1 (or .3, .4 via local_address)
        -> nginx on 127.0.0.1:P        (appends the peer to X-Forwarded-For)
        -> proxy_bind 127.0.0.2        (so the services see nginx as 127.0.0.2)
        -> three `bastion serve` processes on 127.0.0.1:P1..P3
        -> one Redis

Only ``127.0.0.2/32`` is configured as a trusted proxy. Were nginx to connect from
127.0.0.1, the client and the proxy would share an address, and a test that a
spoofed ``X-Forwarded-For`` is ignored would prove nothing.

Every wait here is on real time (processes start and stop on their own clocks)
and bounded, so a broken server fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any, TypeVar

import httpx
import pytest
from shutdown_support import STARTUP_SECONDS, ServedProcess, free_port

T = TypeVar("T")

PROXY_ADDRESS = "127.0.0.2"
STOP_SECONDS = 10.0
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

_NGINX_CONF = Template(
    """\
# Written by tests/cluster/nginx_support.py; every path is under this directory.
$user
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;

events {
    worker_connections 1024;
}

http {
    client_body_temp_path $dir/client_body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    log_format upstream '$$remote_addr "$$request" $$status $$upstream_addr';
    access_log $dir/access.log upstream;

    upstream bastion {
$servers
        keepalive 32;
    }

    server {
        listen 127.0.0.1:$port;
        location / {
            proxy_pass http://bastion;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $$host;
            proxy_set_header X-Forwarded-For $$proxy_add_x_forwarded_for;
            # The services must see nginx at an address of its own (see the module docstring).
            proxy_bind $proxy_address;
            # A failed or slow instance must show in the test, not be retried on another.
            proxy_next_upstream off;
            proxy_connect_timeout 5s;
            proxy_read_timeout 10s;
        }
    }
}
"""
)


def nginx_binary() -> str | None:
    """Debian's nginx (package ``nginx``); /usr/sbin is not on every user's PATH."""
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


def unavailable(what: str, reason: str) -> None:
    """A tool or service a module-scoped fixture needs is missing: fail in CI, skip elsewhere.

    The ``service_unavailable`` fixture does the same for function-scoped fixtures.
    """
    if IN_CI:
        pytest.fail(f"{what} is required in CI but unavailable: {reason}", pytrace=False)
    pytest.skip(f"{what} unavailable: {reason}")


def redis_server_binary() -> str | None:
    """The ``redis-server`` executable (Debian package ``redis-server``)."""
    found = shutil.which("redis-server")
    if found is None and os.access("/usr/bin/redis-server", os.X_OK):
        found = "/usr/bin/redis-server"
    return found


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, log: Path) -> None:
    """Connect to 127.0.0.1:``port`` until it accepts, failing if ``process`` exits first."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        if process.poll() is not None:
            text = log.read_text() if log.exists() else ""
            pytest.fail(f"{what} exited {process.returncode}\n{text}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not listening on {port} after {STARTUP_SECONDS} s")
        time.sleep(0.05)


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Signal a process we started and reap it; SIGKILL if it outlives the bound."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_SECONDS)


class NginxProxy:
    """One nginx in the foreground, round-robin over ``upstreams`` on 127.0.0.1.

    Started by the constructor; the caller records it (to stop it at the end)
    before it waits with ``wait_until_listening``.

    Args:
        binary: path of the nginx executable.
        directory: where the configuration, pid file, logs and temp paths go.
        upstreams: ports of the services behind it.
    """

    def __init__(self, binary: str, directory: Path, upstreams: list[int]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        servers = "\n".join(f"        server 127.0.0.1:{port};" for port in upstreams)
        conf = directory / "nginx.conf"
        conf.write_text(
            _NGINX_CONF.substitute(
                # As root the workers would switch to "nobody" and lose the directory,
                # which pytest makes private (0700); as anyone else nginx ignores it.
                user="user root;" if os.geteuid() == 0 else "",
                dir=directory,
                servers=servers,
                port=self.port,
                proxy_address=PROXY_ADDRESS,
            )
        )
        self.error_log = directory / "error.log"
        self.access_log = directory / "access.log"
        with (directory / "nginx.out").open("wb") as out:
            self.process = subprocess.Popen(
                # -e: errors before the configuration is read go here too, not /var/log.
                [binary, "-p", directory, "-c", conf, "-e", self.error_log, "-g", "daemon off;"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_until_listening(self) -> None:
        wait_for_port(self.port, self.process, "nginx", self.error_log)

    def upstreams_used(self) -> dict[str, int]:
        """Requests per upstream address, from nginx's own access log."""
        counts: dict[str, int] = {}
        for line in self.access_log.read_text().splitlines():
            upstream = line.rsplit(" ", 1)[-1]
            counts[upstream] = counts.get(upstream, 0) + 1
        return counts

    def stop(self) -> None:
        # SIGTERM is nginx's fast stop: the master stops its workers, then exits.
        stop_process(self.process)


def launch_services(
    count: int, app: str, env: Mapping[str, str], directory: Path
) -> list[ServedProcess]:
    """Start ``count`` `bastion serve APP` processes at once, without waiting for them.

    Started together rather than one after another: each spends about a second
    importing, and the machine has two CPUs to overlap them. The caller records
    them (to kill them at the end) before it waits with ``wait_until_ready``.
    """
    # The test's own environment must not configure the servers: a module-scoped
    # fixture runs before the per-test cleaning of BASTION_* variables.
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("BASTION_") or name.startswith("BASTION_TEST_")
    }
    environment["BASTION_CONFIG_FILE"] = str(directory / "absent-bastion.toml")
    # Nor choose the metrics directory.
    environment.pop("PROMETHEUS_MULTIPROC_DIR", None)
    environment.update({"BASTION_LOGGING__FORMAT": "json", **env})
    services = []
    for index in range(count):
        logs = directory / f"serve-{index}"
        logs.mkdir(parents=True)
        port = free_port()
        services.append(ServedProcess([app, "--port", str(port)], environment, logs, port))
    return services


class RedisServer:
    """A private ``redis-server`` on a free port, which a test may kill and restart.

    The shared Redis on 6379 is never touched: other tests use it at the same time.
    """

    def __init__(self, binary: str, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        """Start (or start again, on the same port) with nothing persisted."""
        self.starts += 1
        log = self.directory / f"redis-{self.starts}.log"
        self.process = subprocess.Popen(
            [
                *(self.binary, "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--logfile", log, "--dir", self.directory),
            ],
        )
        wait_for_port(self.port, self.process, "redis-server", log)

    def kill(self) -> None:
        """SIGKILL: a crashed Redis, as its clients see it (connections reset, then refused)."""
        assert self.process is not None
        stop_process(self.process, signal.SIGKILL)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def scripts_exist(self, *shas: str) -> list[bool]:
        """``SCRIPT EXISTS``, through a short-lived client of the test's own."""
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)
        try:
            return [bool(found) for found in client.script_exists(*shas)]
        finally:
            client.close()


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request as the client saw it, timed with the test's own monotonic clock.

    ``status`` is 0 when the request failed below HTTP (``error`` says how).
    """

    sent: float
    received: float
    status: int
    headers: httpx.Headers
    body: bytes
    error: str = ""

    @property
    def remaining(self) -> int:
        return int(self.headers["x-ratelimit-remaining"])

    @property
    def decided(self) -> bool:
        """Whether the store decided it: a limited answer admitted or refused by a bucket
        carries Remaining; one let through or refused because the store failed does not."""
        return "x-ratelimit-remaining" in self.headers

    def json(self) -> Any:
        return json.loads(self.body)


async def send(
    url: str,
    *,
    seconds: float,
    connections: int,
    local_address: str = "127.0.0.1",
    count: int | None = None,
    interval: float = 0.0,
    headers: Callable[[int], dict[str, str]] | None = None,
    path: str = "/hit",
) -> list[Exchange]:
    """Send requests on ``connections`` concurrent connections for ``seconds``.

    Each connection sends its next request as soon as the last one is answered
    (``interval`` 0: as fast as it can) or ``interval`` seconds after the last
    one was sent (a steady rate). Stops at ``seconds`` or after ``count`` requests.

    Args:
        url: the proxy's base URL.
        seconds: the run's length; no request is sent after it.
        connections: concurrent connections, each kept alive.
        local_address: the source address the requests come from.
        count: at most this many requests in all.
        interval: per connection, seconds between two sends.
        headers: extra headers of the n-th request.
        path: what every request asks for.

    Returns:
        Every exchange, in the order the client received the answers.
    """
    transport = httpx.AsyncHTTPTransport(
        local_address=local_address,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    )
    exchanges: list[Exchange] = []
    issued = 0
    async with httpx.AsyncClient(transport=transport, base_url=url, timeout=15.0) as client:
        deadline = time.monotonic() + seconds

        async def connection() -> None:
            nonlocal issued
            while time.monotonic() < deadline and (count is None or issued < count):
                number = issued
                issued += 1
                sent = time.monotonic()
                extra = headers(number) if headers is not None else None
                try:
                    response = await client.get(path, headers=extra)
                except httpx.TransportError as exc:
                    received = time.monotonic()
                    failed = Exchange(sent, received, 0, httpx.Headers(), b"", repr(exc))
                    exchanges.append(failed)
                else:
                    received = time.monotonic()
                    exchanges.append(
                        Exchange(
                            sent, received, response.status_code, response.headers, response.content
                        )
                    )
                if interval:
                    await asyncio.sleep(max(0.0, sent + interval - time.monotonic()))

        await asyncio.gather(*(connection() for _ in range(connections)))
    return exchanges


def run_async(work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` from synchronous code, on an event loop of its own in another thread.

    A thread, so that the loop of an async test or fixture, if any, is left alone.
    """
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, work).result()


def send_now(url: str, **options: Any) -> list[Exchange]:
    """:func:`send` from synchronous code."""
    return run_async(send(url, **options))
