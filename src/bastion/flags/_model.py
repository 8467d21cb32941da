"""What a flag is: key, type, switch, variants, ordered rules, overrides, prerequisites, schedule.

These models are bastion's own flag format: what ``/admin/features`` takes and
returns, what ``bastion flags export`` writes and what the database stores (as
the JSON of :meth:`Flag.model_dump`). They are validated once, when a flag is
written or imported; evaluation runs on what :mod:`bastion.flags._engine`
compiles from them, never on these objects.

The model follows Unleash's so that an Unleash export converts without loss of
meaning: a rule is a strategy (constraints, segments, a rollout, variants), a
variant carries Unleash's payload, a prerequisite is a dependency. Context
field names are Unleash's (``userId``, ``sessionId``, ``remoteAddress``,
``environment``, ``appName``, ``currentTime``) plus bastion's (``tenantId``,
``roles``, ``email``, ``emailDomain``, ``appVersion``); the snake_case
spellings (``user_id``, ``ip``...) are accepted and stored as those.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
import unicodedata
from collections.abc import Callable
from typing import Annotated, Any, Final, Literal

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from bastion.flags._constraints import (
    parse_datetime,
    parse_network,
    parse_number,
    parse_version,
    regex_problem,
)

__all__ = [
    "CONTEXT_ALIASES",
    "FLAG_KEY_MAX",
    "LENIENT_OPERANDS",
    "Constraint",
    "Flag",
    "FlagType",
    "Operator",
    "Prerequisite",
    "Rollout",
    "Rule",
    "ScheduledChange",
    "Segment",
    "TenantOverride",
    "Variant",
    "VariantOverride",
    "VariantPayload",
]

FLAG_KEY_MAX: Final = 200
"""Longest flag key or segment name (Unleash allows UTF-8 names; so does bastion)."""
_FORBIDDEN_CATEGORIES: Final = frozenset({"Cc", "Cf", "Zl", "Zp"})
"""Control and format characters (bidi overrides, zero-width) and line or paragraph
separators: they corrupt logs and exports, or make two different keys look alike."""
JSON_DEPTH_MAX: Final = 32
"""Deepest nesting of a JSON value a flag serves (``default``, a variant's value or payload):
deeper documents cost stack and time in every serializer downstream."""
RULES_MAX: Final = 1000
CONSTRAINTS_MAX: Final = 100
"""Per rule, and per segment."""
VALUES_MAX: Final = 1000
"""Per constraint (and per variant override)."""
VARIANTS_MAX: Final = 100
"""Per flag, and per rule."""
TENANTS_MAX: Final = 1000
TAGS_MAX: Final = 50
TAG_MAX: Final = 100
"""Longest tag."""
WEIGHT_TOTAL: Final = 1000
"""Unleash's variant weights add up to 1000 (tenths of a percent)."""

CONTEXT_ALIASES: Final[dict[str, str]] = {
    "user_id": "userId",
    "session_id": "sessionId",
    "ip": "remoteAddress",
    "remote_address": "remoteAddress",
    "app_name": "appName",
    "current_time": "currentTime",
    "tenant_id": "tenantId",
    "email_domain": "emailDomain",
    "app_version": "appVersion",
}
"""Snake_case context names accepted in bastion's format, and the canonical name each means."""


def _printable(value: str) -> bool:
    """Whether ``value`` holds no control, format or line-separator character."""
    if value.isascii():
        # The common case, without a per-character lookup.
        return value.isprintable()
    category = unicodedata.category
    return not any(category(c) in _FORBIDDEN_CATEGORIES for c in value)


def _key(value: str) -> str:
    if not value or len(value) > FLAG_KEY_MAX:
        raise ValueError(f"must be 1 to {FLAG_KEY_MAX} characters")
    if "/" in value or not _printable(value):
        raise ValueError(
            "must not contain '/', control or format characters (such as bidi overrides "
            "or zero-width characters) or line separators"
        )
    return value


FlagKey = Annotated[str, AfterValidator(_key)]


def _context_name(value: str) -> str:
    value = value.strip()
    if not value or len(value) > FLAG_KEY_MAX:
        raise ValueError(f"a context field name is 1 to {FLAG_KEY_MAX} characters")
    if not _printable(value):
        raise ValueError("a context field name has no control or format characters")
    return CONTEXT_ALIASES.get(value, value)


def _rule_id(value: str | None) -> str | None:
    return None if value is None else _key(value)


def _tag(value: str) -> str:
    if not value or len(value) > TAG_MAX or not _printable(value):
        raise ValueError(f"a tag is 1 to {TAG_MAX} printable characters")
    return value


def check_json_depth(value: Any, what: str = "the value") -> Any:
    """``value`` itself; :class:`ValueError` when it nests deeper than :data:`JSON_DEPTH_MAX`.

    Iterative, so a hostile document cannot exhaust the stack here either.
    """
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        depth += 1
        if depth > JSON_DEPTH_MAX:
            raise ValueError(f"{what} nests deeper than {JSON_DEPTH_MAX} levels")
        pending.extend((child, depth) for child in children)
    return value


ContextName = Annotated[str, AfterValidator(_context_name)]


LENIENT_OPERANDS: Final[dict[str, Any]] = {"operands": "lenient"}
"""Validation context that reads constraint operands as Unleash's SDKs do: a value that
does not parse (a regular expression, a number, a date, a version, a network) makes the
constraint never match instead of being refused.

The Unleash reader builds its constraints with it, because the Unleash client
specification requires this reading, and stored rows load with it: what was stored
before the check existed, or came from an Unleash state, must still load
(``Flag.model_validate(data, context=LENIENT_OPERANDS)``). Everything else (bastion's own
documents on the admin routes, the CLI and the seed file, and ``Constraint(...)`` in
code) refuses such values.
"""


def _lenient(info: ValidationInfo) -> bool:
    context = info.context
    return isinstance(context, dict) and context.get("operands") == "lenient"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


class FlagType(enum.StrEnum):
    """What a flag's value is."""

    BOOLEAN = "boolean"
    """On or off; variants, if any, name the arm of an experiment."""
    STRING = "string"
    NUMBER = "number"
    JSON = "json"
    """Any JSON value (an object, usually): configuration served by a flag."""


class Operator(enum.StrEnum):
    """Constraint operators: Unleash's names, so its exports need no translation."""

    IN = "IN"
    NOT_IN = "NOT_IN"
    STR_CONTAINS = "STR_CONTAINS"
    STR_STARTS_WITH = "STR_STARTS_WITH"
    STR_ENDS_WITH = "STR_ENDS_WITH"
    NUM_EQ = "NUM_EQ"
    NUM_GT = "NUM_GT"
    NUM_GTE = "NUM_GTE"
    NUM_LT = "NUM_LT"
    NUM_LTE = "NUM_LTE"
    DATE_AFTER = "DATE_AFTER"
    DATE_BEFORE = "DATE_BEFORE"
    SEMVER_EQ = "SEMVER_EQ"
    SEMVER_GT = "SEMVER_GT"
    SEMVER_GTE = "SEMVER_GTE"
    SEMVER_LT = "SEMVER_LT"
    SEMVER_LTE = "SEMVER_LTE"
    REGEX = "REGEX"
    """A regular expression, searched with a time bound (``flags.regex_timeout``)."""
    IN_CIDR = "IN_CIDR"
    """The context value is an IP address inside one of the listed networks or addresses."""


SINGLE_VALUE_OPERATORS: Final = frozenset(
    {
        Operator.NUM_EQ,
        Operator.NUM_GT,
        Operator.NUM_GTE,
        Operator.NUM_LT,
        Operator.NUM_LTE,
        Operator.DATE_AFTER,
        Operator.DATE_BEFORE,
        Operator.SEMVER_EQ,
        Operator.SEMVER_GT,
        Operator.SEMVER_GTE,
        Operator.SEMVER_LT,
        Operator.SEMVER_LTE,
        Operator.REGEX,
    }
)
"""Operators that compare against ``value`` rather than ``values``."""

_NUMBER: Final = (parse_number, "invalid_number", "not a number (such as 42 or -1.5)")
_DATE: Final = (
    parse_datetime,
    "invalid_date",
    "not an ISO 8601 date and time (such as 2026-01-31T12:00:00Z)",
)
_SEMVER: Final = (
    parse_version,
    "invalid_semver",
    "not a semantic version (such as 1.2.3 or 2.0.0-beta.1)",
)
_OPERAND_CHECKS: Final[dict[Operator, tuple[Callable[[str], object], str, str]]] = {
    Operator.NUM_EQ: _NUMBER,
    Operator.NUM_GT: _NUMBER,
    Operator.NUM_GTE: _NUMBER,
    Operator.NUM_LT: _NUMBER,
    Operator.NUM_LTE: _NUMBER,
    Operator.DATE_AFTER: _DATE,
    Operator.DATE_BEFORE: _DATE,
    Operator.SEMVER_EQ: _SEMVER,
    Operator.SEMVER_GT: _SEMVER,
    Operator.SEMVER_GTE: _SEMVER,
    Operator.SEMVER_LT: _SEMVER,
    Operator.SEMVER_LTE: _SEMVER,
    Operator.IN_CIDR: (
        parse_network,
        "invalid_cidr",
        "not an IP address or network (such as 10.0.0.0/8 or 2001:db8::/32)",
    ),
}
"""Per operator: the parser the engine reads an operand with, and the error code and
message when it cannot (REGEX is checked apart: its message says why)."""


def _operand_problem(operator: Operator, operand: str) -> tuple[str, str] | None:
    """The error code and message when ``operand`` can never match under ``operator``."""
    if operator is Operator.REGEX:
        why = regex_problem(operand)
        if why is None:
            return None
        return "invalid_regex", f"not a regular expression Unleash's SDKs accept: {why}"
    check = _OPERAND_CHECKS.get(operator)
    if check is None:
        return None
    parse, code, message = check
    return None if parse(operand) is not None else (code, message)


def _checked_operand(operand: str | None, info: ValidationInfo) -> str | None:
    """Refuse, in bastion's own format, an operand the engine would read as "never matches".

    Only the field the operator reads is checked (``value``, or ``values`` for
    ``IN_CIDR``), so each error is located at the offending item
    (``rules.0.constraints.1.values.0``).
    """
    if operand is None or _lenient(info):
        return operand
    operator = info.data.get("operator")
    if operator is None:
        # The operator itself was refused; that error says enough.
        return operand
    reads_values = operator is Operator.IN_CIDR
    if reads_values != (info.field_name == "values"):
        return operand
    problem = _operand_problem(operator, operand)
    if problem is None:
        return operand
    code, message = problem
    # The message goes through the context, so braces in it are never read as placeholders.
    raise PydanticCustomError(code, "{message}", {"message": message})


Operand = Annotated[str, AfterValidator(_checked_operand)]


class Constraint(_Model):
    """One condition on the evaluation context.

    Multi-valued operators (``IN``, ``NOT_IN``, ``STR_*``, ``IN_CIDR``) take
    ``values``; the others take ``value``. A context field that is a list (``roles``)
    matches ``IN`` when any of its items is listed. A missing field never matches
    (``NOT_IN`` excepted, as in Unleash); ``inverted`` negates the result. An empty
    ``values`` lists nothing (``IN`` matches no one, ``NOT_IN`` everyone), as Unleash
    reads it: its exports carry such constraints.
    """

    context: ContextName
    operator: Operator
    values: tuple[Operand, ...] = Field(default=(), max_length=VALUES_MAX)
    value: Annotated[str | None, AfterValidator(_checked_operand)] = None
    inverted: StrictBool = False
    case_insensitive: StrictBool = False

    @model_validator(mode="after")
    def _operands(self) -> Constraint:
        if self.operator in SINGLE_VALUE_OPERATORS and self.value is None:
            raise ValueError(f"{self.operator} compares against 'value', which is missing")
        return self


class Rollout(_Model):
    """Who, of those the rule's constraints admit, gets the rule: a stable percentage.

    The bucket is Unleash's: MurmurHash3 (32-bit, seed 0) of
    ``"<group_id>:<stickiness value>"``, modulo 100, plus 1; the rule applies when
    the bucket is at most ``percentage``. A context without the stickiness field
    is outside the rollout (``random`` excepted).
    """

    percentage: float = Field(default=100, ge=0, le=100)
    stickiness: ContextName = "default"
    """``default`` (``userId``, else ``sessionId``, else random), ``random``, or a context field."""
    group_id: str | None = None
    """Hashed with the stickiness value; ``None`` means the flag's key. Two flags with
    one group id bucket every user alike."""


class VariantPayload(_Model):
    """What a variant serves, as Unleash carries it: a type and a string."""

    type: Literal["string", "json", "csv", "number"]
    value: str


class VariantOverride(_Model):
    """Context values that always get this variant (Unleash's variant overrides)."""

    context: ContextName
    values: tuple[str, ...] = Field(max_length=VALUES_MAX)


class Variant(_Model):
    """One arm of a split: a name, a weight and what it serves.

    ``value`` is the typed value (what a string, number or JSON flag returns);
    ``payload`` the same as Unleash carries it. Give either: the other is derived.
    """

    name: Annotated[str, AfterValidator(_key)]
    weight: int = Field(default=WEIGHT_TOTAL, ge=0, le=WEIGHT_TOTAL)
    weight_type: Literal["variable", "fix"] = "variable"
    """Kept for Unleash exports (its server spreads ``variable`` weights); evaluation uses
    ``weight`` as given, relative to the sum of the variants' weights."""
    stickiness: ContextName = "default"
    payload: VariantPayload | None = None
    value: Any = None
    overrides: tuple[VariantOverride, ...] = Field(default=(), max_length=VARIANTS_MAX)

    @model_validator(mode="after")
    def _value_and_payload(self) -> Variant:
        check_json_depth(self.value, f"variant {self.name!r}'s value")
        if self.payload is None and self.value is not None:
            object.__setattr__(self, "payload", payload_of(self.value))
        elif self.payload is not None and self.value is None:
            value = value_of(self.payload)
            check_json_depth(value, f"variant {self.name!r}'s payload")
            object.__setattr__(self, "value", value)
        return self


def payload_of(value: Any) -> VariantPayload:
    """The Unleash payload that carries a typed ``value``."""
    if isinstance(value, (bool, dict, list)):
        return VariantPayload(type="json", value=orjson.dumps(value).decode())
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("a number variant must be finite")
        return VariantPayload(type="number", value=repr(value))
    if isinstance(value, str):
        return VariantPayload(type="string", value=value)
    raise ValueError(f"a variant value must be JSON, not {type(value).__name__}")


def value_of(payload: VariantPayload) -> Any:
    """The typed value an Unleash ``payload`` carries (a malformed one: its string)."""
    try:
        if payload.type == "json":
            return orjson.loads(payload.value)
        if payload.type == "number":
            number = float(payload.value)
            return int(number) if number.is_integer() and "." not in payload.value else number
    except (orjson.JSONDecodeError, ValueError):
        return payload.value
    return payload.value


class Rule(_Model):
    """One targeting rule: whom it admits (constraints, segments, rollout) and what they get.

    Rules are tried in order; the first that admits the context decides. What it
    serves is, in order: ``variant`` (a fixed variant, by name), a weighted pick
    among ``variants`` (the rule's own), else a weighted pick among the flag's.
    """

    id: Annotated[str | None, AfterValidator(_rule_id)] = None
    """Named in evaluation results and explanations; ``None``: its position, ``rules[2]``."""
    constraints: tuple[Constraint, ...] = Field(default=(), max_length=CONSTRAINTS_MAX)
    segments: tuple[str | int, ...] = Field(default=(), max_length=CONSTRAINTS_MAX)
    """Segments by name or Unleash id; all must match, as the constraints."""
    rollout: Rollout | None = None
    """``None``: everyone the constraints and segments admit."""
    variant: str | None = None
    variants: tuple[Variant, ...] = Field(default=(), max_length=VARIANTS_MAX)
    disabled: StrictBool = False
    """Kept but skipped (Unleash's ``disabled`` strategies)."""
    strategy: str | None = None
    """The Unleash strategy this rule was imported from when bastion cannot express it
    (a custom strategy): such a rule never matches, and is exported back unchanged."""
    parameters: dict[str, str] = Field(default_factory=dict)
    """That strategy's parameters, kept for the export."""

    @model_validator(mode="after")
    def _one_outcome(self) -> Rule:
        if self.variant is not None and self.variants:
            raise ValueError("a rule serves a fixed 'variant' or weighted 'variants', not both")
        return self


class Prerequisite(_Model):
    """Another flag that must be on (or off) for this one to be on (Unleash's dependencies)."""

    flag: FlagKey
    enabled: StrictBool = True
    variants: tuple[str, ...] = ()
    """When given, the prerequisite must also serve one of these variants."""


class TenantOverride(_Model):
    """What one tenant gets, before any rule: on or off, and optionally a fixed variant."""

    enabled: StrictBool
    variant: str | None = None


class ScheduledChange(_Model):
    """Switch the flag on or off at a time.

    Applied by every instance at that time (each evaluates the schedule itself), and
    persisted by the first that sees it due.
    """

    at: dt.datetime
    enabled: StrictBool

    @field_validator("at")
    @classmethod
    def _aware(cls, value: dt.datetime) -> dt.datetime:
        if value.tzinfo is None:
            raise ValueError("give a time zone (UTC: a trailing 'Z')")
        return value.astimezone(dt.UTC)


class Segment(_Model):
    """A named, reusable set of constraints that rules refer to."""

    name: FlagKey
    id: int | None = None
    """Unleash's numeric id, kept so imported rules that cite it still resolve."""
    description: str = Field(default="", max_length=2000)
    constraints: tuple[Constraint, ...] = Field(default=(), max_length=CONSTRAINTS_MAX)


class Flag(_Model):
    """A feature flag: bastion's stored and exchanged form.

    Evaluation order: the kill switch (``enabled``, as the schedule has it now),
    prerequisites, the tenant's override, then ``rules`` in order. A flag that is
    on with no rules is on for everyone. When off for a context, the flag serves
    ``default``.
    """

    key: FlagKey
    type: FlagType = FlagType.BOOLEAN
    description: str = Field(default="", max_length=2000)
    owner: str | None = Field(default=None, max_length=200)
    tags: tuple[Annotated[str, AfterValidator(_tag)], ...] = Field(default=(), max_length=TAGS_MAX)
    enabled: StrictBool = False
    """The kill switch: off, the flag serves ``default`` to everyone, overrides included."""
    default: Any = None
    """Served when the flag is off for a context; ``None``: ``False`` for a boolean flag."""
    variants: tuple[Variant, ...] = Field(default=(), max_length=VARIANTS_MAX)
    rules: tuple[Rule, ...] = Field(default=(), max_length=RULES_MAX)
    prerequisites: tuple[Prerequisite, ...] = Field(default=(), max_length=VARIANTS_MAX)
    tenants: dict[Annotated[str, AfterValidator(_key)], TenantOverride] = Field(
        default_factory=dict, max_length=TENANTS_MAX
    )
    """Per-tenant overrides, by tenant id (at most 200 characters)."""
    schedule: tuple[ScheduledChange, ...] = ()
    client_visible: StrictBool = False
    """Served by ``GET /api/features`` to front ends."""
    impression_data: StrictBool = False
    """Kept from Unleash exports; bastion does not emit impression events."""

    @model_validator(mode="after")
    def _consistent(self) -> Flag:
        if self.default is None and self.type is FlagType.BOOLEAN:
            object.__setattr__(self, "default", False)
        check_json_depth(self.default, "default")
        _check_type(self.type, self.default, "default", allow_none=True)
        if (
            self.type is not FlagType.BOOLEAN
            and not self.variants
            and not any(rule.variants or rule.variant for rule in self.rules)
        ):
            raise ValueError(f"a {self.type} flag serves its variants' values: give at least one")
        names = {variant.name for variant in self.variants}
        for variant in (*self.variants, *(v for rule in self.rules for v in rule.variants)):
            if self.type is not FlagType.BOOLEAN:
                _check_type(self.type, variant.value, f"variant {variant.name!r}", allow_none=False)
        for position, rule in enumerate(self.rules):
            own = {variant.name for variant in rule.variants}
            if rule.variant is not None and rule.variant not in names | own:
                raise ValueError(f"rules[{position}] names variant {rule.variant!r}, not defined")
        for tenant, override in self.tenants.items():
            if override.variant is not None and override.variant not in names:
                raise ValueError(
                    f"tenant {tenant!r} names variant {override.variant!r}, not defined"
                )
        if any(prerequisite.flag == self.key for prerequisite in self.prerequisites):
            raise ValueError("a flag cannot be its own prerequisite")
        object.__setattr__(self, "schedule", tuple(sorted(self.schedule, key=lambda c: c.at)))
        return self

    def enabled_at(self, now: dt.datetime) -> bool:
        """The kill switch as the schedule sets it at ``now``."""
        enabled = self.enabled
        for change in self.schedule:
            if change.at > now:
                break
            enabled = change.enabled
        return enabled


def _check_type(kind: FlagType, value: Any, what: str, *, allow_none: bool) -> None:
    if value is None:
        if allow_none:
            return
        raise ValueError(f"{what}: a {kind} flag needs a value")
    if kind is FlagType.BOOLEAN:
        ok = isinstance(value, bool)
    elif kind is FlagType.STRING:
        ok = isinstance(value, str)
    elif kind is FlagType.NUMBER:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = True
    if not ok:
        raise ValueError(f"{what}: {value!r} is not a {kind}")
