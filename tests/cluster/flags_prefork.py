"""A pre-forking server for the flag cluster test, as gunicorn ``--preload`` runs one.

The parent imports the app (``bastion.install`` runs here, once, before any
fork) and binds the listening sockets, then forks one child per socket, which
serves it with uvicorn and runs the app's lifespan after the fork. The test
checks that every forked worker keeps its flags current: the Unleash Python
SDK's refresh thread does not survive such a fork.

One socket per worker, not one shared: the test asks each worker in turn, where
a shared socket would leave which worker answers to the kernel.

Usage: ``python tests/cluster/flags_prefork.py 8001 8002``; SIGTERM stops the
children and then the parent.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from pathlib import Path

import uvicorn

# The repository, so that `tests.cluster.flags_app` imports as `bastion serve` imports it.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.cluster.flags_app import app


def _listen(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return sock


def _serve(sock: socket.socket) -> None:
    config = uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


def main() -> None:
    sockets = [_listen(int(port)) for port in sys.argv[1:]]
    children = []
    for sock in sockets:
        pid = os.fork()
        if pid == 0:
            _serve(sock)
            os._exit(0)
        children.append(pid)

    def stop(_signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for child in children:
        os.waitpid(child, 0)


if __name__ == "__main__":
    main()
