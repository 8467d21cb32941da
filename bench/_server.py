"""Serves one benchmark variant with uvicorn: ``python bench/_server.py VARIANT PORT``.

Every variant gets the same server configuration: one process, loopback,
uvloop and httptools when installed, uvicorn's own logging and access log off
(``log_config=None``, ``access_log=False``). The bastion variants write their
own JSON access log to standard output, which the benchmark redirects to a file.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _apps import VARIANTS


def server_options() -> dict[str, str]:
    """Return the event loop and HTTP parser every variant is served with."""
    return {
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        "http": "httptools" if importlib.util.find_spec("httptools") else "h11",
    }


def main() -> None:
    """Build the variant's app and serve it until terminated."""
    variant, port = sys.argv[1], int(sys.argv[2])
    app = VARIANTS[variant][0]()
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        **server_options(),
    )


if __name__ == "__main__":
    main()
