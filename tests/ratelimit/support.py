"""Helpers the quota, login and middleware tests share."""

from __future__ import annotations

import socket

from bastion.ratelimit._scripts import ScriptRunner


class WallClock:
    """Epoch seconds that move only when the test says."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CountingRunner(ScriptRunner):
    """A runner that counts the scripts it runs (each call is one round trip or part of one)."""

    calls = 0

    async def run(self, script, keys, args):
        self.calls += 1
        return await super().run(script, keys, args)
