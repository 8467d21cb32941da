"""HTML-bearing fields sanitised against an allow-list with nh3 (Rust's ammonia).

Sanitising happens on input, so the model (and the database) holds only safe
HTML: every place that later renders the value (the web UI, an e-mail, an export
opened in a browser) is safe without remembering to escape, and a stored-XSS
payload never reaches storage. The cost is that the original markup is not
kept; a field that must keep it should be plain :func:`~bastion.guard.Text`
escaped at output instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Final

import nh3

from bastion.guard._fields import StringRule, clean_text, too_long

__all__ = [
    "DEFAULT_ATTRIBUTES",
    "DEFAULT_TAGS",
    "DEFAULT_URL_SCHEMES",
    "HtmlRule",
    "SafeHtml",
    "sanitize_html",
]

DEFAULT_TAGS: Final = frozenset(
    {
        "a",
        "abbr",
        "b",
        "blockquote",
        "br",
        "code",
        "del",
        "em",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "hr",
        "i",
        "ins",
        "kbd",
        "li",
        "ol",
        "p",
        "pre",
        "q",
        "s",
        "small",
        "strong",
        "sub",
        "sup",
        "u",
        "ul",
    }
)
"""Text-level and block tags with no behaviour: no script, style, iframe, form,
image (a remote image is a tracking pixel and an exfiltration channel) or media."""

DEFAULT_ATTRIBUTES: Final[Mapping[str, frozenset[str]]] = {
    "a": frozenset({"href", "title"}),
    "abbr": frozenset({"title"}),
}
"""Attributes kept per tag; no ``style``, ``class`` or event handler (``on...``)."""

DEFAULT_URL_SCHEMES: Final = ("http", "https", "mailto")

_LINK_REL: Final = "noopener noreferrer"


def sanitize_html(
    text: str,
    *,
    tags: Iterable[str] = DEFAULT_TAGS,
    attributes: Mapping[str, Iterable[str]] = DEFAULT_ATTRIBUTES,
    url_schemes: Iterable[str] = DEFAULT_URL_SCHEMES,
) -> str:
    """Return ``text`` with every tag, attribute and URL scheme not allowed removed.

    Comments are dropped, links get ``rel="noopener noreferrer"``, and text is
    escaped where it would otherwise read as markup. The result sanitised again
    is unchanged.

    Example:
        >>> sanitize_html('<p onclick="x()">Hi <script>alert(1)</script></p>')
        '<p>Hi </p>'

    Args:
        text: the HTML to clean.
        tags: tags to keep.
        attributes: attributes to keep, per tag (``"*"`` for every tag).
        url_schemes: schemes allowed in URL attributes (relative URLs are kept).

    Returns:
        The sanitised HTML.
    """
    tag_set = set(tags)
    attribute_map = {tag: set(names) - {"rel"} for tag, names in attributes.items()}
    schemes = set(url_schemes)
    clean = nh3.clean(
        text,
        tags=tag_set,
        attributes=attribute_map,
        url_schemes=schemes,
        link_rel=_LINK_REL,
        strip_comments=True,
    )
    # html5ever re-serialises what it parsed, and a second pass over some broken
    # inputs can still move text; loop until the fixed point so the stored value
    # is stable (it almost always is after the first pass).
    for _ in range(3):
        again = nh3.clean(
            clean,
            tags=tag_set,
            attributes=attribute_map,
            url_schemes=schemes,
            link_rel=_LINK_REL,
            strip_comments=True,
        )
        if again == clean:
            break
        clean = again
    return clean


@dataclass(frozen=True, slots=True)
class HtmlRule(StringRule):
    """The validation :func:`SafeHtml` attaches to ``str``.

    Attributes:
        max_length: most characters of the sanitised HTML.
        tags: tags kept.
        attributes: attributes kept per tag.
        url_schemes: schemes allowed in URL attributes.
    """

    max_length: int
    tags: frozenset[str] = DEFAULT_TAGS
    attributes: Mapping[str, frozenset[str]] = field(
        default_factory=lambda: dict(DEFAULT_ATTRIBUTES)
    )
    url_schemes: tuple[str, ...] = DEFAULT_URL_SCHEMES

    def validate(self, value: str) -> str:
        """Clean the text like multiline :func:`Text`, sanitise it, then check the bound."""
        value = clean_text(value, multiline=True)
        value = sanitize_html(
            value, tags=self.tags, attributes=self.attributes, url_schemes=self.url_schemes
        )
        if len(value) > self.max_length:
            raise too_long(self.max_length)
        return value

    def json_schema_extra(self) -> dict[str, Any]:
        """Return the bound and the ``text/html`` media type."""
        return {"maxLength": self.max_length, "contentMediaType": "text/html"}

    def __hash__(self) -> int:
        # ``attributes`` is a dict; pydantic hashes metadata when it caches schemas.
        return hash((self.max_length, self.tags, self.url_schemes))


def SafeHtml(  # noqa: N802 -- a type factory, named like the type it makes
    max_length: int,
    *,
    tags: Iterable[str] = DEFAULT_TAGS,
    attributes: Mapping[str, Iterable[str]] = DEFAULT_ATTRIBUTES,
    url_schemes: Iterable[str] = DEFAULT_URL_SCHEMES,
) -> Any:
    """Return a type for an HTML field, sanitised on input against an allow-list.

    The model holds the sanitised HTML; ``max_length`` bounds it (escaping can
    make it longer than what the client sent).

    Example:
        >>> class Comment(BaseModel):
        ...     body: SafeHtml(10_000)

    Args:
        max_length: most characters of the sanitised HTML.
        tags: tags kept.
        attributes: attributes kept per tag (``"*"`` for every tag).
        url_schemes: schemes allowed in URL attributes.

    Returns:
        ``Annotated[str, HtmlRule(...)]``.
    """
    rule = HtmlRule(
        max_length,
        frozenset(tags),
        {tag: frozenset(names) for tag, names in attributes.items()},
        tuple(url_schemes),
    )
    return Annotated[str, rule]
