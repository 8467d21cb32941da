"""Helpers shared by the http tests: bastion installed with only the ``http`` settings given.

Imported as ``from http_support import ...``: this directory is on the path, as pytest
puts it (prepend mode), as tests/cluster does with ``nginx_support``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

import bastion
from bastion.settings import load_settings

APP = "https://app.example.com"
PROBLEM = "application/problem+json"


def install_http(app: FastAPI, http: dict[str, Any]) -> None:
    """Install bastion on ``app`` with these ``http`` settings, no database, audit or flags.

    Logging stays on (WARNING, JSON), as the wired layers log their refusals.
    """
    config = load_settings(
        http=http,
        database={"enabled": False},
        audit={"enabled": False},
        flags={"enabled": False},
        logging={"level": "WARNING", "format": "json"},
    )
    bastion.install(app, settings=config)
