"""Constrained string types for pydantic models: bounded text, slugs, identifiers, e-mail.

Each factory returns an ``Annotated[str, ...]`` type, like pydantic's ``constr``:

    class DocumentIn(BaseModel):
        title: SingleLine(200)
        body: Text(20_000, multiline=True)
        slug: Slug()
        owner: Email

A value over its bound fails with pydantic's ``string_too_long`` error type and a
``limit`` in its context, which bastion's 422 handler turns into ``INPUT_TOO_LONG``
with ``limit`` in the ``errors`` entry. The length error is only reported for a value
that is otherwise valid, so ``INPUT_TOO_LONG`` means "shorten it and it passes".
Error messages never repeat the value: it may be a secret or personal data.

mypy does not accept a call in an annotation; declare the alias under
``TYPE_CHECKING`` (``Title = str``) when the models are type-checked.
"""

from __future__ import annotations

import re
import unicodedata
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Annotated, Any, Final

import email_validator
from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

__all__ = [
    "Email",
    "EmailRule",
    "Identifier",
    "PatternRule",
    "SingleLine",
    "Slug",
    "StringRule",
    "Text",
    "TextRule",
    "clean_text",
    "string_schema",
    "too_long",
]

EMAIL_MAX_LENGTH: Final = 254
"""RFC 5321's bound on a forward path, less the angle brackets."""

# Removed, not refused: pasted text carries them innocently (editors insert BOMs and
# zero-width spaces), and they only ever serve to make text look unlike what it is
# (Trojan Source bidi overrides, invisible splits of words a filter looks for). The
# zero-width joiner and non-joiner (U+200C, U+200D) stay: emoji sequences and Persian
# and Indic scripts need them. U+061C (Arabic letter mark) is a bidi control too, and
# U+2061-U+2064 are invisible operators.
_REMOVABLE: Final = re.compile(
    "[\u061c\u200b\u200e\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]"
)

# Refused: C0 and C1 controls, DEL, lone surrogates (JSON can spell them as
# ``\ud800`` and the stdlib decoder lets them through). Single-line text also
# refuses LF, CR, TAB and the Unicode line and paragraph separators.
_SINGLE_LINE_BAD: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_MULTILINE_BAD: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_LINE_BREAK: Final = frozenset("\n\r\t\u2028\u2029")


def too_long(limit: int, unit: str = "characters") -> PydanticCustomError:
    """The error for a value over its bound, which the 422 handler answers as ``INPUT_TOO_LONG``.

    Args:
        limit: the bound the value broke.
        unit: what ``limit`` counts, for the message.

    Returns:
        A ``string_too_long`` error with ``limit`` in its context.
    """
    return PydanticCustomError(
        "string_too_long", f"Value must be at most {{limit}} {unit}.", {"limit": limit}
    )


_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def _refuse_surrogates(value: Any) -> Any:
    # The stdlib JSON decoder turns ``"\\ud800"`` into a lone surrogate, which pydantic's
    # ``str`` lets through in some paths and chokes on (UnicodeEncodeError) in others.
    if isinstance(value, str) and not value.isascii() and _SURROGATE.search(value):
        raise PydanticCustomError("string_unicode", "Text must be valid Unicode.")
    return value


def string_schema(validate: Any, inner: core_schema.CoreSchema) -> core_schema.CoreSchema:
    """Wrap ``inner`` (a ``str`` schema) so lone surrogates are refused, then run ``validate``.

    Args:
        validate: the after-validator taking and returning ``str``.
        inner: the schema pydantic built for ``str``.

    Returns:
        The combined core schema.
    """
    return core_schema.no_info_before_validator_function(
        _refuse_surrogates, core_schema.no_info_after_validator_function(validate, inner)
    )


class StringRule(ABC):
    """The pydantic custom-type protocol shared by the ``str`` rules (usable in ``Annotated``).

    A subclass implements :meth:`validate` (the after-validator, run once lone
    surrogates are refused) and may extend the JSON schema with
    :meth:`json_schema_extra`.
    """

    __slots__ = ()

    @abstractmethod
    def validate(self, value: str) -> str:
        """Return ``value`` checked and normalised; raises pydantic errors."""

    def json_schema_extra(self) -> dict[str, Any]:
        """Return the keys this rule adds to the JSON schema pydantic built for ``str``."""
        return {}

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return string_schema(self.validate, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        json_schema.update(self.json_schema_extra())
        return json_schema


def _control(value: str, bad: re.Pattern[str]) -> PydanticCustomError | None:
    found = bad.search(value)
    if found is None:
        return None
    if found.group() in _LINE_BREAK:
        return PydanticCustomError("control_character", "Text must be a single line.")
    return PydanticCustomError("control_character", "Text must not contain control characters.")


def clean_text(
    value: str, *, multiline: bool = False, normalize: bool = True, strip: bool = True
) -> str:
    """Return ``value`` cleaned the way :func:`Text` cleans it, without any length check.

    Args:
        value: the text a client sent.
        multiline: allow TAB, LF, CR and the Unicode line/paragraph separators.
        normalize: apply Unicode NFC normalisation.
        strip: remove leading and trailing whitespace.

    Returns:
        The text with bidirectional controls and zero-width characters removed,
        NFC-normalised and stripped as asked.

    Raises:
        PydanticCustomError: ``control_character`` for a control character, a NUL,
            a lone surrogate, or a line break in single-line text.
    """
    bad = _MULTILINE_BAD if multiline else _SINGLE_LINE_BAD
    error = _control(value, bad)
    if error is not None:
        raise error
    # ASCII (most input) can hold neither removable characters nor anything NFC changes.
    if not value.isascii():
        if _REMOVABLE.search(value) is not None:
            value = _REMOVABLE.sub("", value)
        if normalize and not unicodedata.is_normalized("NFC", value):
            value = unicodedata.normalize("NFC", value)
    return value.strip() if strip else value


@dataclass(frozen=True, slots=True)
class TextRule(StringRule):
    """The validation :func:`Text` attaches to ``str`` (usable in ``Annotated`` directly).

    Attributes:
        max_length: most characters after cleaning.
        min_length: fewest characters after cleaning.
        multiline: allow line breaks and tabs.
        normalize: NFC-normalise.
        strip: strip surrounding whitespace.
        max_bytes: most UTF-8 bytes after cleaning, when bounded.
    """

    max_length: int
    min_length: int = 0
    multiline: bool = False
    normalize: bool = True
    strip: bool = True
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.min_length <= self.max_length:
            raise ValueError("need 0 <= min_length <= max_length")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ValueError("max_bytes must be positive")

    def validate(self, value: str) -> str:
        """Clean ``value`` and check its bounds; raises pydantic errors."""
        value = clean_text(
            value, multiline=self.multiline, normalize=self.normalize, strip=self.strip
        )
        length = len(value)
        if length > self.max_length:
            raise too_long(self.max_length)
        if self.max_bytes is not None and (
            length > self.max_bytes or len(value.encode()) > self.max_bytes
        ):
            raise too_long(self.max_bytes, "bytes")
        if length < self.min_length:
            # ``min_length``, never ``limit``: the 422 handler reads ``limit`` as "too long".
            raise PydanticCustomError(
                "string_too_short",
                "Value must be at least {min_length} characters.",
                {"min_length": self.min_length},
            )
        return value

    def json_schema_extra(self) -> dict[str, Any]:
        """Return ``maxLength`` and, when set, ``minLength`` and ``x-max-bytes``."""
        extra: dict[str, Any] = {"maxLength": self.max_length}
        if self.min_length:
            extra["minLength"] = self.min_length
        if self.max_bytes is not None:
            extra["x-max-bytes"] = self.max_bytes
        return extra


def Text(  # noqa: N802 -- a type factory, named like the type it makes (pydantic's constr)
    max_length: int,
    *,
    min_length: int = 0,
    multiline: bool = False,
    normalize: bool = True,
    strip: bool = True,
    max_bytes: int | None = None,
) -> Any:
    """Return a bounded, cleaned text type.

    Cleaning, in order: control characters are refused (C0 except TAB/LF/CR when
    ``multiline``, C1, DEL, NUL always, lone surrogates); bidirectional overrides
    and isolates (U+202A-U+202E, U+2066-U+2069) and zero-width/format characters
    (U+200B-U+200F, U+2060, U+FEFF) are removed; the text is NFC-normalised and
    stripped. Bounds are then checked in characters (and UTF-8 bytes with
    ``max_bytes``) on the cleaned text.

    Example:
        >>> class Note(BaseModel):
        ...     body: Text(2000, multiline=True)

    Args:
        max_length: most characters.
        min_length: fewest characters (after stripping).
        multiline: allow line breaks and tabs.
        normalize: NFC-normalise.
        strip: strip surrounding whitespace.
        max_bytes: most UTF-8 bytes, for columns bounded in bytes.

    Returns:
        ``Annotated[str, TextRule(...)]``.
    """
    rule = TextRule(max_length, min_length, multiline, normalize, strip, max_bytes)
    return Annotated[str, rule]


def SingleLine(max_length: int, *, min_length: int = 0) -> Any:  # noqa: N802 -- type factory
    """Return a bounded one-line text type: :func:`Text` without line breaks or tabs.

    Args:
        max_length: most characters.
        min_length: fewest characters (after stripping).

    Returns:
        ``Annotated[str, TextRule(...)]``.
    """
    return Text(max_length, min_length=min_length)


@dataclass(frozen=True, slots=True)
class PatternRule(StringRule):
    """A bounded ASCII token matching one pattern (slugs, identifiers).

    Attributes:
        max_length: most characters.
        pattern: the regular expression the whole value must match.
        code: the pydantic error type for a mismatch.
        message: the error message for a mismatch (never the value).
    """

    max_length: int
    pattern: str
    code: str
    message: str

    def validate(self, value: str) -> str:
        """Check the pattern, then the bound (so too long means only too long)."""
        if re.fullmatch(self.pattern, value) is None:
            raise PydanticCustomError(self.code, self.message)
        if len(value) > self.max_length:
            raise too_long(self.max_length)
        return value

    def json_schema_extra(self) -> dict[str, Any]:
        """Return the bound, a minimum of one character and the pattern."""
        return {"maxLength": self.max_length, "minLength": 1, "pattern": self.pattern}


# Unambiguous patterns (no nested quantifier can match the same text two ways), so
# matching stays linear on hostile input.
SLUG_PATTERN: Final = "^[a-z0-9]+(?:-[a-z0-9]+)*$"
IDENTIFIER_PATTERN: Final = "^[A-Za-z_][A-Za-z0-9_.:-]*$"


def _pattern_type(max_length: int, pattern: str, code: str, message: str) -> Any:
    return Annotated[str, PatternRule(max_length, pattern, code, message)]


def Slug(max_length: int = 64) -> Any:  # noqa: N802 -- type factory
    """Return a URL slug type: lowercase ``a-z``, ``0-9`` and single inner hyphens.

    Args:
        max_length: most characters.

    Returns:
        ``Annotated[str, PatternRule(...)]``.
    """
    return _pattern_type(
        max_length,
        SLUG_PATTERN,
        "slug_invalid",
        "Must be lowercase letters, digits and single hyphens, not at either end.",
    )


def Identifier(max_length: int = 64) -> Any:  # noqa: N802 -- type factory
    """Return an identifier type: ``[A-Za-z_][A-Za-z0-9_.:-]*``.

    Args:
        max_length: most characters.

    Returns:
        ``Annotated[str, PatternRule(...)]``.
    """
    return _pattern_type(
        max_length,
        IDENTIFIER_PATTERN,
        "identifier_invalid",
        "Must start with a letter or underscore, then letters, digits or _ . : -.",
    )


# email-validator's messages quote parts of the address; only these fixed reasons
# reach the client, picked by what the library's message is about.
_EMAIL_REASONS: Final = (
    ("special-use or reserved", "The domain of the email address is a reserved name."),
    ("after the @-sign", "The domain of the email address is not valid."),
    ("domain", "The domain of the email address is not valid."),
    ("before the @-sign", "The part before the @-sign is not valid."),
    ("local part", "The part before the @-sign is not valid."),
    ("too long", "Part of the email address is too long."),
    ("@-sign", "An email address needs exactly one @-sign with text on both sides."),
)
_EMAIL_FALLBACK: Final = "Not a valid email address."


def _email_reason(message: str) -> str:
    for needle, reason in _EMAIL_REASONS:
        if needle in message:
            return reason
    return _EMAIL_FALLBACK


@dataclass(frozen=True, slots=True)
class EmailRule(StringRule):
    """An e-mail address checked for syntax only (no DNS), normalised.

    Attributes:
        max_length: most characters (254 by RFC 5321).
    """

    max_length: int = EMAIL_MAX_LENGTH

    def validate(self, value: str) -> str:
        """Return the normalised address (domain lowercased and NFC)."""
        value = value.strip()
        # Bound first: the address bound is a protocol fact, and it keeps the parser
        # away from megabyte strings.
        if len(value) > self.max_length:
            raise too_long(self.max_length)
        try:
            result = email_validator.validate_email(value, check_deliverability=False)
        except email_validator.EmailNotValidError as exc:
            raise PydanticCustomError(
                "email_invalid", "{reason}", {"reason": _email_reason(str(exc))}
            ) from None
        normalized: str = result.normalized
        if len(normalized) > self.max_length:
            raise too_long(self.max_length)
        return normalized

    def json_schema_extra(self) -> dict[str, Any]:
        """Return the ``email`` format and the bound."""
        return {"format": "email", "maxLength": self.max_length}


Email = Annotated[str, EmailRule()]
"""An e-mail address (syntax checked, no DNS lookup), normalised, at most 254 characters."""
