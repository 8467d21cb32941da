"""Helpers for shutdown tests: real `bastion serve` processes, raw uploads, bounded waits.

A test that drives a real server has to wait on real time: the server starts,
drains and exits on its own clock. Every such wait is bounded (`deadline`), so a
broken server fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
STARTUP_SECONDS = 30.0  # spawn + imports on a loaded 2-CPU CI machine, with margin
EXIT_SECONDS = 20.0


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bastion_command() -> list[str]:
    """The installed `bastion` console script, or the same entry point through Python."""
    script = Path(sys.executable).with_name("bastion")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from bastion.cli import main; main()"]


class ServedProcess:
    """A `bastion serve` subprocess whose output goes to files read after the fact."""

    def __init__(self, args: list[str], env: dict[str, str], logs: Path, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.stdout_path = logs / "stdout.log"
        self.stderr_path = logs / "stderr.log"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                [*bastion_command(), "serve", *args], cwd=REPO, env=env, stdout=out, stderr=err
            )

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = EXIT_SECONDS) -> int:
        return self.process.wait(timeout=timeout)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log line written so far."""
        lines = self.stdout_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def event_names(self) -> list[str]:
        return [event["event"] for event in self.events()]

    def describe(self) -> str:
        return f"stdout:\n{self.stdout_path.read_text()}\nstderr:\n{self.stderr}"

    def wait_until_logged(self, event: str, count: int = 1) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while self.event_names().count(event) < count:
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"never logged {event!r} x{count}\n{self.describe()}")
            time.sleep(0.05)

    def wait_until_ready(self) -> None:
        # Real time: the process imports the app and runs its start-up hooks.
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"server exited {self.process.returncode}\n{self.describe()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/health/ready", timeout=1.0).status_code == 200:
                    return
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready in {STARTUP_SECONDS} s\n{self.describe()}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=EXIT_SECONDS)


async def wait_for(predicate: Callable[[], Any], *, seconds: float, what: str) -> None:
    """Poll an async or sync predicate until it holds, at most ``seconds`` of real time."""
    deadline = time.monotonic() + seconds
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds} s waiting for {what}")
        await asyncio.sleep(0.02)


async def refuses_connections(port: int) -> bool:
    """Whether a new TCP connection to ``port`` is refused."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        # Accepted into the backlog just as the listener closed: ask again.
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return False


async def start_upload(port: int, body: bytes, sent: int) -> tuple[Any, Any]:
    """Open a raw connection and send a POST's head and the first ``sent`` body bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        "POST /upload HTTP/1.1\r\n"
        "host: test\r\n"
        "content-type: application/octet-stream\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    writer.write(head + body[:sent])
    await writer.drain()
    return reader, writer


async def finish_upload(reader: Any, writer: Any, rest: bytes) -> tuple[int, dict[str, Any]]:
    """Send the rest of the body; return the status and JSON body of the response."""
    writer.write(rest)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), timeout=EXIT_SECONDS)
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(payload)
