"""The shape of a JSON body: encoding, NUL characters, syntax, nesting depth and value count.

Counted once, before the app parses anything, so that a body a few kilobytes
long cannot make the app build a million-element structure or recurse a
thousand levels. The body is parsed once by orjson (which checks UTF-8 and
syntax, and refuses more than 1024 levels); the common body's shape is then
cleared cheaply by upper bounds: its length (a level of nesting takes two
bytes, a value at least two with its separator) and byte counts (every
container opens with ``[`` or ``{``, every value but the root follows ``[``,
``,`` or ``:``). Only a body whose bounds pass a limit, or that holds a
``\u0000`` escape, has its parsed value walked, iteratively, stopping at the
first limit it passes.

The figures:

- depth: the deepest nesting of arrays and objects (a scalar is 0, ``[]`` is 1,
  ``{"a": [1]}`` is 2);
- elements: every value counts once: the root, each array item and each
  object member's value (keys are not counted), so ``{"a": [1, 2]}`` is 4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import orjson

__all__ = ["JsonViolation", "inspect_json"]

_NUL_ESCAPE: Final = b"\\u0000"
_BACKSLASH: Final = 0x5C


@dataclass(frozen=True, slots=True)
class JsonViolation:
    """Why a JSON body was refused.

    Attributes:
        reason: the ``bastion_guard_rejections_total`` label.
        code: the field error code in the problem's ``errors``.
        message: the field error's message; it never quotes the body.
        limit: the bound the body broke, if it broke one.
    """

    reason: str
    code: str
    message: str
    limit: int | None = None


INVALID_UTF8: Final = JsonViolation("invalid_utf8", "invalid_utf8", "The body is not valid UTF-8.")
NUL_CHARACTER: Final = JsonViolation(
    "nul_character", "nul_character", "The body contains a NUL character."
)


def _too_deep(limit: int) -> JsonViolation:
    return JsonViolation(
        "json_depth", "too_deep", f"The body nests arrays and objects deeper than {limit}.", limit
    )


def _too_many(limit: int) -> JsonViolation:
    return JsonViolation(
        "json_elements", "too_many_elements", f"The body holds more than {limit} values.", limit
    )


def _invalid(error: orjson.JSONDecodeError) -> JsonViolation:
    # orjson's message is not passed on: some quote what they expected, and a
    # future one might quote what it found.
    return JsonViolation(
        "json_invalid",
        "json_invalid",
        f"The body is not valid JSON (line {error.lineno}, column {error.colno}).",
    )


def inspect_json(body: bytes, *, max_depth: int, max_elements: int) -> JsonViolation | None:  # noqa: PLR0911 -- one return per verdict reads best
    """Check a JSON body; return why it is refused, or ``None`` when it is fine.

    An empty body is fine (there is nothing to parse; the app decides whether
    the route needs one). orjson's strictness applies: numbers out of the range
    of a double, a byte-order mark and unpaired surrogate escapes are invalid.

    Args:
        body: the whole request body.
        max_depth: the deepest nesting allowed.
        max_elements: the most values allowed.
    """
    if not body:
        return None
    # Single bytes are looked up as ints: ``0 in body`` is a memchr, ``b"\x00" in
    # body`` a substring search that costs ten times more (bench/guard.py).
    if 0 in body:
        # A raw NUL is invalid JSON anyway; it is named for what it is.
        return NUL_CHARACTER
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        if not body.isascii():
            try:
                body.decode()
            except UnicodeDecodeError:
                return INVALID_UTF8
        if "depth" in error.msg or "recursion" in error.msg:
            # orjson parses at most 1024 levels: deeper than any limit allowed.
            return _too_deep(max_depth)
        return _invalid(error)
    # Upper bounds, cheapest first. Each level of nesting takes two bytes and each
    # value at least two (itself and a separator), so the length alone clears most
    # bodies of the value count (10,000 values need 20 KB); then byte counts, which
    # brackets, commas and colons inside strings only make larger. A body whose
    # bounds pass a limit is walked, to count exactly.
    size = len(body)
    check_nul = _BACKSLASH in body and _NUL_ESCAPE in body
    deep = size > 2 * max_depth and body.count(b"[") + body.count(b"{") > max_depth
    many = (
        not deep
        and (size + 1) // 2 > max_elements
        and 1 + body.count(b"[") + body.count(b",") + body.count(b":") > max_elements
    )
    if not (deep or many or check_nul):
        return None
    return _walk(value, max_depth, max_elements, check_nul=check_nul)


def _walk(  # noqa: PLR0911, PLR0912 -- one loop, early exits: splitting it costs a call per value
    value: Any, max_depth: int, max_elements: int, *, check_nul: bool
) -> JsonViolation | None:
    """Count depth and values of a parsed document, stopping at the first limit passed."""
    if type(value) is str:
        return NUL_CHARACTER if check_nul and "\x00" in value else None
    if type(value) is not dict and type(value) is not list:
        return None
    elements = 1
    stack: list[tuple[Any, int]] = [(value, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        container, depth = pop()
        if depth > max_depth:
            return _too_deep(max_depth)
        elements += len(container)
        if elements > max_elements:
            return _too_many(max_elements)
        if type(container) is dict:
            if check_nul and any("\x00" in key for key in container):
                return NUL_CHARACTER
            children = container.values()
        else:
            children = container
        for child in children:
            kind = type(child)
            if kind is dict or kind is list:
                if child:
                    push((child, depth + 1))
                elif depth + 1 > max_depth:
                    return _too_deep(max_depth)
            elif check_nul and kind is str and "\x00" in child:
                return NUL_CHARACTER
    return None
