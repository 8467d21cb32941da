"""Whole flag sets as documents: bastion's export format, Unleash states and exports, JSON and YAML.

One reader for the seed file, the import route and ``bastion flags import``, and
one writer for the export route and ``bastion flags export``, so the three agree on
what a document is and how a bad one is reported.
"""

from __future__ import annotations

from typing import Any, Final, TypeVar

import orjson
import yaml
from pydantic import BaseModel, ValidationError

from bastion.errors import FieldError, InvalidInput
from bastion.flags._model import LENIENT_OPERANDS, Flag, Segment
from bastion.flags._unleash import UNLEASH_FIELDS, flags_from_unleash, is_unleash_state, to_unleash

__all__ = [
    "DOCUMENT_VERSION",
    "ERRORS_MAX",
    "EXPORT_ROWS_MAX",
    "FLAGS_MAX",
    "SEGMENTS_MAX",
    "dump_document",
    "import_fields",
    "load_text",
    "parse_document",
    "validation_errors",
]

M = TypeVar("M", bound=BaseModel)


def load_text(text: str, name: str) -> Any:
    """Parse JSON or YAML text (JSON when ``name`` ends in ``.json`` or the text starts like it).

    Raises:
        ValueError: it is neither (the message names ``name`` and why).
    """
    if name.endswith(".json") or text.lstrip().startswith(("{", "[")):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"{name} is not valid JSON: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{name} is neither JSON nor valid YAML: {exc}") from None


DOCUMENT_VERSION: Final = 1
"""Version of bastion's export document, ``{"version": 1, "flags": [...], "segments": [...]}``."""
FLAGS_MAX: Final = 10_000
"""Most flags one document may hold: far beyond any real set, and a bound on the work."""
SEGMENTS_MAX: Final = 10_000
"""Most segments one document may hold."""
EXPORT_ROWS_MAX: Final = 100_000
"""Most strategy or environment rows one Unleash export may hold."""
ERRORS_MAX: Final = 100
"""Field errors reported before parsing gives up: enough to fix, too few to flood."""


def parse_document(
    document: Any, *, field: str = "body", environment: str | None = None
) -> tuple[list[Flag], list[Segment]]:
    """Read an import: an Unleash state or export (``features``) or a bastion document (``flags``).

    A bare list is a list of bastion flags.

    Args:
        document: the parsed JSON (or YAML).
        field: where it came from, for error locations.
        environment: which environment of an Unleash export to read when it holds
            several (the flags settings' ``environment``); an export of one
            environment is read whatever its name.

    Raises:
        InvalidInput: it is neither, it holds more than :data:`FLAGS_MAX` flags or
            :data:`SEGMENTS_MAX` segments, or a flag or segment in it is invalid
            (one field error per problem, located by position; parsing stops
            after :data:`ERRORS_MAX`). An Unleash state is read strictly: what
            bastion cannot translate faithfully is an error, not a guess; so is
            an export holding several environments none of which is
            ``environment`` (the error names them).
    """
    if isinstance(document, list):
        document = {"flags": document}
    if not isinstance(document, dict):
        raise InvalidInput(
            errors=[FieldError(field, "invalid", "must be an Unleash state or a bastion document.")]
        )
    unleash = _is_unleash(document)
    many = "features" if unleash else "flags"
    _check_size(document.get(many), FLAGS_MAX, f"{field}.{many}")
    _check_size(document.get("segments"), SEGMENTS_MAX, f"{field}.segments")
    for part in ("featureStrategies", "featureEnvironments"):
        # An export's rows: a few per flag, and each environment's once more.
        _check_size(document.get(part), EXPORT_ROWS_MAX, f"{field}.{part}")
    if unleash:
        return _from_unleash(document, field, environment)
    if "flags" not in document:
        raise InvalidInput(
            errors=[
                FieldError(
                    field,
                    "invalid",
                    "must hold 'flags' (bastion's format) or 'features' (an Unleash state).",
                )
            ]
        )
    errors: list[FieldError] = []
    flags = _models(Flag, document.get("flags"), f"{field}.flags", errors)
    segments = _models(Segment, document.get("segments") or [], f"{field}.segments", errors)
    if errors:
        raise InvalidInput(
            "The document has invalid flags or segments.", errors=_capped(errors, field)
        )
    return flags, segments


def import_fields(document: Any) -> frozenset[str] | None:
    """The fields an import of ``document`` may set on a flag that exists already.

    An Unleash state or export says nothing of bastion's own fields (type, default, tags,
    client visibility, tenant overrides, schedule), so merging one keeps those
    of the stored flag (:data:`~bastion.flags._unleash.UNLEASH_FIELDS`); a bastion
    document sets every field (``None``).
    """
    if isinstance(document, dict) and _is_unleash(document):
        return UNLEASH_FIELDS
    return None


def _is_unleash(document: dict[str, Any]) -> bool:
    return is_unleash_state(document) and "flags" not in document


def _check_size(items: Any, limit: int, field: str) -> None:
    # Counted before anything is validated: the bound is on the work, not only the result.
    if isinstance(items, list) and len(items) > limit:
        raise InvalidInput(
            "The document is too large.",
            errors=[FieldError(field, "too_long", f"at most {limit} items, not {len(items)}.")],
        )


def _models(model: type[M], items: Any, field: str, errors: list[FieldError]) -> list[M]:
    if not isinstance(items, list):
        errors.append(FieldError(field, "invalid", "must be a list."))
        return []
    parsed = []
    for position, item in enumerate(items):
        if len(errors) > ERRORS_MAX:
            break
        try:
            # Operands are read as stored rows are (one that does not parse never matches):
            # an export holds what was stored, and must import back whatever it holds.
            # Single writes (the admin routes, `bastion flags set`) check them.
            parsed.append(model.model_validate(item, context=LENIENT_OPERANDS))
        except ValidationError as exc:
            errors.extend(validation_errors(exc, f"{field}.{position}"))
    return parsed


def _capped(errors: list[FieldError], field: str) -> list[FieldError]:
    """At most :data:`ERRORS_MAX` errors, and a last one saying when more were left out."""
    if len(errors) <= ERRORS_MAX:
        return errors
    stopped = FieldError(field, "too_many_errors", f"parsing stopped after {ERRORS_MAX} errors.")
    return [*errors[:ERRORS_MAX], stopped]


def _from_unleash(
    state: dict[str, Any], field: str, environment: str | None
) -> tuple[list[Flag], list[Segment]]:
    try:
        return flags_from_unleash(state, strict=True, environment=environment)
    except ValidationError as exc:
        raise InvalidInput(
            "The Unleash state has invalid features.",
            errors=_capped(validation_errors(exc, field), field),
        ) from None
    except ValueError as exc:
        # Strict reading says where the state went wrong, before a colon:
        # ``features[3].strategies[0].constraints: must be a list``.
        where, colon, why = str(exc).partition(": ")
        location = f"{field}.{where}" if colon and where and " " not in where else field
        raise InvalidInput(
            "The Unleash state cannot be read.",
            errors=[FieldError(location, "invalid", why if location != field else str(exc))],
        ) from None
    except (TypeError, KeyError) as exc:
        raise InvalidInput(
            "The Unleash state cannot be read.",
            errors=[FieldError(field, "invalid", f"{type(exc).__name__}: {exc}")],
        ) from None


def dump_document(flags: list[Flag], segments: list[Segment], kind: str = "bastion") -> Any:
    """The export of a whole set: bastion's document, or an Unleash state (``kind="unleash"``)."""
    if kind == "unleash":
        return to_unleash(flags, segments)
    return {
        "version": DOCUMENT_VERSION,
        "flags": [flag.model_dump(mode="json", exclude_defaults=True) for flag in flags],
        "segments": [
            segment.model_dump(mode="json", exclude_defaults=True) for segment in segments
        ],
    }


def validation_errors(exc: ValidationError, field: str) -> list[FieldError]:
    """Pydantic's errors as bastion's field errors, located under ``field``."""
    errors = []
    for error in exc.errors(include_input=False, include_url=False):
        location = ".".join(str(part) for part in (field, *error["loc"]))
        message = error["msg"].removeprefix("Value error, ")
        errors.append(FieldError(location, error["type"], message))
    return errors
