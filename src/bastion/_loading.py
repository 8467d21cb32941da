"""Loading the app a command or the server acts on, from a ``module:attribute`` spec."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
from typing import Any

from bastion._stack import Bastion
from bastion.errors import ConfigurationError

__all__ = ["load_app", "load_runtime"]


def load_app(spec: str) -> Any:
    """Import ``module:attribute`` and return the ASGI app, calling it if it is a factory.

    Raises:
        ConfigurationError: the spec is malformed or names nothing importable.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"app must be MODULE:ATTRIBUTE, not {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r}: {exc}") from exc
    try:
        target = getattr(module, attribute)
    except AttributeError:
        raise ConfigurationError(f"{module_name!r} has no attribute {attribute!r}") from None
    if inspect.isclass(target) or not callable(target) or _is_asgi_app(target):
        return target
    return target()


def _is_asgi_app(target: Any) -> bool:
    # A factory takes no arguments; an ASGI app takes (scope, receive, send).
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return True
    return len(parameters) == 3  # noqa: PLR2004 -- the ASGI calling convention


def load_runtime(spec: str) -> Bastion:
    """Load the app and return what ``bastion.install`` put on it.

    For commands, whose standard output is their result: what the app logs while
    it is built (a development secret generated, say) goes to standard error.

    Raises:
        ConfigurationError: the app cannot be loaded or has no bastion installed.
    """
    with contextlib.redirect_stdout(sys.stderr):
        app = load_app(spec)
    state = getattr(app, "state", None)
    runtime = getattr(state, "bastion", None)
    if not isinstance(runtime, Bastion):
        raise ConfigurationError(f"{spec} has no bastion installed; call bastion.install(app)")
    return runtime
