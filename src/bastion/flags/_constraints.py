"""Constraints compiled into predicates over a flat evaluation context, with Unleash's semantics.

A predicate takes the context as one dict of canonical names (``userId``,
``tenantId``, any property...) and answers ``True`` or ``False``; it never
raises, except :class:`RegexTimeout` (a regular expression that ran out of
time ends the whole evaluation: see :mod:`._engine`). Everything that can be
prepared once is prepared when the constraint is compiled: value sets,
case-folded copies, parsed numbers, dates, versions, networks and regular
expressions. What Unleash's SDKs do on odd input is what these do: a value
that does not parse makes the constraint false, an unknown operator makes it
false whatever ``inverted`` says, ``NOT_IN`` on a missing field is true, and
``inverted`` negates the operator's answer otherwise.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from operator import eq, ge, gt, le, lt
from typing import TYPE_CHECKING, Any, Final

import regex
import semver

from bastion.flags._evaluation import EMAIL_DOMAIN, email_domain

if TYPE_CHECKING:
    # Only a type here: the model imports this module's parsers to validate operands.
    from bastion.flags._model import Constraint

__all__ = [
    "ALWAYS",
    "NEVER",
    "FieldDefaults",
    "Predicate",
    "RegexTimeout",
    "compile_constraint",
    "parse_datetime",
    "parse_network",
    "parse_number",
    "parse_version",
    "regex_problem",
    "text_of",
]

Predicate = Callable[[Mapping[str, Any]], bool]
"""A compiled constraint: the flat context in, whether it holds out."""

FieldDefaults = Mapping[str, Any]
"""Values a missing context field takes (``environment``, ``appName`` from the settings)."""

OnError = Callable[[str], None]
"""Told (with a message free of context values) when a constraint could not be evaluated."""


class RegexTimeout(Exception):
    """A ``REGEX`` search ran out of time: the evaluation it belongs to ends with ``ERROR``.

    The budget is one timeout per evaluation: the first ends it, so a context built to
    make every REGEX constraint of a flag time out costs one timeout, not one per rule.
    """

    MESSAGE: Final = "a regular expression timed out"


def ALWAYS(context: Mapping[str, Any]) -> bool:  # noqa: N802 -- a constant predicate
    """The predicate that always holds."""
    return True


def NEVER(context: Mapping[str, Any]) -> bool:  # noqa: N802 -- a constant predicate
    """The predicate that never holds (what cannot be evaluated becomes)."""
    return False


_NUMBER_OPERATORS: Final[dict[str, Callable[[float, float], bool]]] = {
    "NUM_EQ": eq,
    "NUM_GT": gt,
    "NUM_GTE": ge,
    "NUM_LT": lt,
    "NUM_LTE": le,
}
_SEMVER_OPERATORS: Final[dict[str, Callable[[int], bool]]] = {
    "SEMVER_EQ": lambda c: c == 0,
    "SEMVER_GT": lambda c: c > 0,
    "SEMVER_GTE": lambda c: c >= 0,
    "SEMVER_LT": lambda c: c < 0,
    "SEMVER_LTE": lambda c: c <= 0,
}
# Unleash's SDKs (yggdrasil) use Rust's regex crate, which has no look-around,
# backreferences, atomic groups, possessive quantifiers, recursion or conditionals:
# a pattern using them is invalid there, so it never matches here either.
_UNSUPPORTED_REGEX: Final = re.compile(
    r"\(\?<?[=!]|\(\?P=|\(\?>|\(\?\(|\(\?[R&|0-9+-]|\\[1-9]|\\g[<{0-9-]|\\k[<{']|[*+?}]\+"
)


def text_of(value: Any) -> str | None:  # noqa: PLR0911 -- one answer per JSON type
    """A context value as the string Unleash would compare (``None``: no usable value)."""
    if value.__class__ is str:
        return value
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return None


def _items(value: Any) -> Sequence[Any] | None:
    """The items of a multi-valued field (``roles``), ``None`` when the field is a scalar."""
    if isinstance(value, (list, tuple, set, frozenset)):
        return list(value)
    return None


def parse_datetime(value: Any) -> dt.datetime | None:
    """An aware UTC datetime from a datetime or an ISO 8601 string; ``None`` when neither."""
    if isinstance(value, dt.datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            return None
    else:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment


def parse_number(value: Any) -> float | None:
    """A number as Unleash's SDKs read one (JavaScript's ``Number()``); ``None`` when not."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        text = value.strip()
        # JavaScript's Number() (what Unleash's reference SDK uses) rejects Python's
        # "1_000" and "infinity" spellings; so do we.
        if not text or "_" in text:
            return None
        try:
            number = float(text)
        except ValueError:
            return None
    else:
        return None
    return None if math.isnan(number) else number


def parse_version(value: Any) -> semver.Version | None:
    """A semantic version (``1.2.3-beta.1``); ``None`` when ``value`` is not one."""
    if not isinstance(value, str):
        return None
    try:
        return semver.Version.parse(value.strip())
    except (ValueError, TypeError):
        return None


def parse_network(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """A network (``10.0.0.0/8``) or an address (a /32 or /128); ``None`` when neither."""
    try:
        return ipaddress.ip_network(entry.strip(), strict=False)
    except ValueError:
        return None


def _address(value: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text_of(value)
    if text is None:
        return None
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _regex(pattern: str, *, case_insensitive: bool) -> tuple[Any, str | None]:
    """The compiled pattern and ``None``, or ``None`` and why Unleash's SDKs would reject it."""
    if not pattern:
        return None, "the pattern is empty"
    unsupported = _UNSUPPORTED_REGEX.search(pattern)
    if unsupported is not None:
        return None, (
            f"{unsupported.group()!r} is not supported (no look-around, backreferences,"
            " atomic groups, possessive quantifiers, recursion or conditionals)"
        )
    flags = regex.VERSION0 | (regex.IGNORECASE if case_insensitive else 0)
    try:
        return regex.compile(pattern, flags), None
    except (regex.error, ValueError, TypeError, OverflowError) as exc:
        return None, str(exc)


def compile_regex(pattern: str, *, case_insensitive: bool) -> Any:
    """The compiled pattern, or ``None`` when Unleash's SDKs would reject it."""
    return _regex(pattern, case_insensitive=case_insensitive)[0]


def regex_problem(pattern: str) -> str | None:
    """Why ``pattern`` can never match (it does not compile, as Unleash's SDKs read it), or None."""
    return _regex(pattern, case_insensitive=False)[1]


def compile_constraint(
    constraint: Constraint,
    *,
    defaults: FieldDefaults | None = None,
    regex_timeout: float = 0.005,
    now: Callable[[], dt.datetime] | None = None,
    on_error: OnError | None = None,
) -> Predicate:
    """Compile a validated bastion constraint into a predicate.

    Args:
        constraint: the constraint.
        defaults: values of fields the context may lack (``environment``, ``appName``).
        regex_timeout: seconds a ``REGEX`` search may take before it counts as no match.
        now: the clock a date constraint on a missing ``currentTime`` reads.
        on_error: told when a regex search timed out (before :class:`RegexTimeout` is raised).

    Returns:
        The predicate; it raises only :class:`RegexTimeout`.
    """
    predicate = _compile(
        name=constraint.context,
        operator=str(constraint.operator),
        values=constraint.values,
        value=constraint.value,
        inverted=constraint.inverted,
        case_insensitive=constraint.case_insensitive,
        defaults=defaults,
        regex_timeout=regex_timeout,
        now=now,
        on_error=on_error,
    )
    if constraint.context == EMAIL_DOMAIN:
        return _with_email_domain(predicate)
    return predicate


def _with_email_domain(predicate: Predicate) -> Predicate:
    """``predicate`` over a context whose ``emailDomain``, when absent, comes from ``email``.

    Done here rather than when the context is flattened so that dict and Unleash-shaped
    contexts get it too, and only flags that constrain the domain pay for it.
    """

    def derived(context: Mapping[str, Any]) -> bool:
        if EMAIL_DOMAIN in context:
            return predicate(context)
        domain = email_domain(context.get("email"))
        if domain is None:
            return predicate(context)
        return predicate({**context, EMAIL_DOMAIN: domain})

    return derived


def _compile(  # noqa: PLR0911, PLR0912, PLR0915 -- one dispatch over the operators
    *,
    name: str,
    operator: str,
    values: Iterable[str],
    value: str | None,
    inverted: bool,
    case_insensitive: bool,
    defaults: FieldDefaults | None = None,
    regex_timeout: float = 0.005,
    now: Callable[[], dt.datetime] | None = None,
    on_error: OnError | None = None,
) -> Predicate:
    default = (defaults or {}).get(name)
    values = tuple(values)

    if operator in ("IN", "NOT_IN"):
        # Unleash trims the listed values and drops the empty ones.
        cleaned = tuple(v.strip() for v in values if v and v.strip())
        members = frozenset(v.lower() for v in cleaned) if case_insensitive else frozenset(cleaned)
        # NOT_IN answers "not listed", so a missing field satisfies it.
        listed_result = operator == "IN"
        # A precomputed (listed, not listed) pair folds the operator and ``inverted`` into
        # one lookup: no branching on either per evaluation.
        if_listed = listed_result != inverted
        if_not = (not listed_result) != inverted
        fold = case_insensitive

        def membership(context: Mapping[str, Any]) -> bool:
            field = context.get(name, default)
            if field.__class__ is str:
                return if_listed if (field.lower() if fold else field) in members else if_not
            return _membership_slow(field)

        def _membership_slow(field: Any) -> bool:
            items = _items(field)
            if items is None:
                text = text_of(field)
                candidates = [] if text is None else [text]
            else:
                candidates = [t for t in map(text_of, items) if t is not None]
            if fold:
                candidates = [c.lower() for c in candidates]
            return if_listed if any(c in members for c in candidates) else if_not

        return membership

    if operator in ("STR_CONTAINS", "STR_STARTS_WITH", "STR_ENDS_WITH"):
        needles = tuple(v.lower() for v in values) if case_insensitive else values
        if operator == "STR_CONTAINS":

            def test(text: str) -> bool:
                return any(n in text for n in needles)

        elif operator == "STR_STARTS_WITH":
            prefixes = needles

            def test(text: str) -> bool:
                return text.startswith(prefixes)

        else:
            suffixes = needles

            def test(text: str) -> bool:
                return text.endswith(suffixes)

        def strings(context: Mapping[str, Any]) -> bool:
            field = context.get(name, default)
            items = _items(field)
            texts = [text_of(field)] if items is None else [text_of(i) for i in items]
            found = any(test(t.lower() if case_insensitive else t) for t in texts if t is not None)
            return found != inverted

        return strings

    if operator in _NUMBER_OPERATORS:
        compare = _NUMBER_OPERATORS[operator]
        bound = parse_number(value)
        if bound is None:
            return _inverted_constant(False, inverted)

        def numbers(context: Mapping[str, Any]) -> bool:
            number = parse_number(context.get(name, default))
            return (number is not None and compare(number, bound)) != inverted

        return numbers

    if operator in ("DATE_AFTER", "DATE_BEFORE"):
        limit = parse_datetime(value)
        if limit is None:
            return _inverted_constant(False, inverted)
        after = operator == "DATE_AFTER"
        clock = now or (lambda: dt.datetime.now(dt.UTC))
        is_current_time = name == "currentTime"

        def dates(context: Mapping[str, Any]) -> bool:
            raw = context.get(name, default)
            # The clock is read only when the context brings no time of its own.
            moment = clock() if raw is None and is_current_time else parse_datetime(raw)
            if moment is None:
                return inverted
            return (moment > limit if after else moment < limit) != inverted

        return dates

    if operator in _SEMVER_OPERATORS:
        verdict = _SEMVER_OPERATORS[operator]
        target = parse_version(value)
        if target is None:
            return _inverted_constant(False, inverted)

        def versions(context: Mapping[str, Any]) -> bool:
            version = parse_version(context.get(name, default))
            # semver's compare() ignores build metadata, as the specification wants.
            return (version is not None and verdict(version.compare(target))) != inverted

        return versions

    if operator == "REGEX":
        pattern = compile_regex(value or "", case_insensitive=case_insensitive) if value else None
        if pattern is None:
            # Unleash's SDKs reject the whole constraint, so ``inverted`` cannot turn it on.
            return NEVER
        search = pattern.search

        def regexes(context: Mapping[str, Any]) -> bool:
            field = context.get(name, default)
            items = _items(field)
            texts = [text_of(field)] if items is None else [text_of(i) for i in items]
            found = False
            for text in texts:
                if text is None:
                    continue
                try:
                    if search(text, timeout=regex_timeout) is not None:
                        found = True
                        break
                except TimeoutError:
                    if on_error is not None:
                        on_error(f"REGEX on {name!r} exceeded {regex_timeout}s")
                    # Neither a match nor a miss (``inverted`` must not turn it into one):
                    # the evaluation ends here, with the default.
                    raise RegexTimeout(RegexTimeout.MESSAGE) from None
            return found != inverted

        return regexes

    if operator == "IN_CIDR":
        networks = tuple(n for n in map(parse_network, values) if n is not None)

        def cidrs(context: Mapping[str, Any]) -> bool:
            field = context.get(name, default)
            items = _items(field)
            addresses = [_address(field)] if items is None else [_address(i) for i in items]
            found = any(
                a in n
                for a in addresses
                if a is not None
                for n in networks
                if n.version == a.version
            )
            return found != inverted

        return cidrs

    # An operator this SDK does not know: false, inverted or not (as Unleash's SDKs do).
    return NEVER


def _inverted_constant(result: bool, inverted: bool) -> Predicate:
    return ALWAYS if result != inverted else NEVER
