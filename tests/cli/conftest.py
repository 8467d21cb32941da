"""Fixtures for the command line: an in-process runner and the repository root."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
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
