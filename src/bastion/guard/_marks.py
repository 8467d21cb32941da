"""``@limits``: a route's own body size, media types and JSON shape limits, marked on the endpoint.

The decorator only marks the endpoint and returns it unchanged (FastAPI still
reads its signature); the guard finds the mark when it reads the app's routes,
so the decorator may sit above or below the route decorator. A mark wins over
``guard.route_classes`` and the section's defaults: the code that declares a
route knows best what its body looks like.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

from bastion._routes import mark_endpoint
from bastion.errors import ConfigurationError

__all__ = ["MARK", "ORJSON_MAX_DEPTH", "RouteLimits", "limits", "media_type"]

E = TypeVar("E")

MARK: Final = "__bastion_guard_limits__"
"""The endpoint attribute the decorator sets."""

ORJSON_MAX_DEPTH: Final = 1024
"""The deepest document orjson parses: a deeper limit could never be reached."""


@dataclass(frozen=True, slots=True)
class RouteLimits:
    """What ``@limits`` asked for one endpoint; ``None`` leaves a limit to the settings.

    Attributes:
        body: a route class of ``guard.body_limits``, or a size in bytes.
        content_types: media types the body may have (lowercase, no parameters).
        json_max_depth: deepest nesting of a JSON body.
        json_max_elements: most values in a JSON body.
    """

    body: str | int | None = None
    content_types: tuple[str, ...] | None = None
    json_max_depth: int | None = None
    json_max_elements: int | None = None


def media_type(value: str) -> str:
    """Return the media type of a ``Content-Type`` value: lowercased, parameters dropped."""
    return value.partition(";")[0].strip().lower()


def _check_count(name: str, value: int | None, maximum: int | None = None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"@limits: {name} must be a whole number >= 1, not {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigurationError(f"@limits: {name} must be at most {maximum}, not {value}")


def limits(
    *,
    body: str | int | None = None,
    content_types: Sequence[str] | None = None,
    json_max_depth: int | None = None,
    json_max_elements: int | None = None,
) -> Callable[[E], E]:
    """Give an endpoint its own request-body limits instead of the ``guard`` section's.

    Example:
        >>> @app.post("/v1/documents")
        ... @limits(body="upload", content_types=["multipart/form-data"])
        ... async def upload(...): ...
        >>> @app.post("/v1/notes")
        ... @limits(body=16_384, json_max_depth=4)
        ... async def note(...): ...

    Args:
        body: a route class of ``guard.body_limits`` (``"upload"``), or a size in
            bytes (0: the route takes no body).
        content_types: media types the body may have (``application/json``);
            parameters such as ``charset`` are ignored. An empty list refuses
            every body.
        json_max_depth: deepest nesting of arrays and objects in a JSON body
            (at most 1024, orjson's own bound).
        json_max_elements: most values in a JSON body.

    Raises:
        ConfigurationError: a size, depth or count that is not a whole number
            in range, or a media type without ``/``.
    """
    if (body is not None and not isinstance(body, str)) and (
        isinstance(body, bool) or not isinstance(body, int) or body < 0
    ):
        raise ConfigurationError(
            f"@limits: body is a route class name or a size in bytes >= 0, not {body!r}"
        )
    if isinstance(body, str) and not body.strip():
        raise ConfigurationError("@limits: body names an empty route class")
    types: tuple[str, ...] | None = None
    if content_types is not None:
        if isinstance(content_types, str):
            raise ConfigurationError("@limits: content_types is a list of media types")
        types = tuple(dict.fromkeys(media_type(value) for value in content_types))
        wrong = [value for value in types if "/" not in value]
        if wrong:
            raise ConfigurationError(f"@limits: not media types: {wrong}")
    _check_count("json_max_depth", json_max_depth, ORJSON_MAX_DEPTH)
    _check_count("json_max_elements", json_max_elements)
    return mark_endpoint(
        "limits", MARK, RouteLimits(body, types, json_max_depth, json_max_elements)
    )
