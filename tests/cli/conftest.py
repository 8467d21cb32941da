"""Fixtures for the command line: an in-process runner and the repository root."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog
from click.testing import Result
from typer.testing import CliRunner

from bastion.cli import _register, app


@pytest.fixture
def repo_root() -> Path:
    """The repository root, where `tests.lifecycle...` app modules import from."""
    return Path(__file__).resolve().parents[2]


@pytest.fixture
def cli() -> Callable[..., Result]:
    """Run `bastion ARGS...` in this process; stdout and stderr are kept apart."""
    _register()
    runner = CliRunner()

    def invoke(*args: str) -> Result:
        return runner.invoke(app, list(args))

    return invoke


_LAZY_PROXY = type(structlog.get_logger())


@pytest.fixture(autouse=True)
def _uncache_loggers() -> Iterator[None]:
    """Make module-level structlog loggers pick up the next configuration.

    With ``cache_logger_on_first_use`` a module's logger keeps the output stream of
    the first configuration it saw; the runner's stream is closed after each
    command, so a later test would write to a closed file.
    """
    yield
    for module in list(sys.modules.values()):
        for value in list(getattr(module, "__dict__", {}).values()):
            if isinstance(value, _LAZY_PROXY):
                value.__dict__.pop("bind", None)
