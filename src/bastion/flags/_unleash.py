"""Unleash's client state (``/api/client/features``) and exports to bastion's flag models, and back.

An export (the admin UI's or ``POST /api/admin/features-batch/export``: ``features``
without switches or strategies, and ``featureStrategies``, ``featureEnvironments``,
``segments``, ``dependencies`` beside them) holds one environment's configuration, or
several in a hand-merged file: :func:`flags_from_unleash` reads the one it is given
(``environment=``), the only one there is, or refuses.

Reading is lenient: an Unleash server, an old export or a hand-written file may
carry anything, and what bastion cannot represent becomes something that never
matches (a constraint listing nothing, a rule kept under its strategy name, a
flag that is off), never an exception. The built-in strategies become rules:

==========================  ===============================================================
Unleash strategy            bastion rule
==========================  ===============================================================
``default``                 no constraint, no rollout: everyone
``userWithId``              ``userId IN userIds``
``gradualRolloutUserId``    rollout with ``userId`` stickiness (``percentage``, ``groupId``)
``gradualRolloutSessionId`` rollout with ``sessionId`` stickiness
``gradualRolloutRandom``    rollout with ``random`` stickiness
``flexibleRollout``         rollout (``rollout``, ``stickiness``, ``groupId``)
``remoteAddress``           ``remoteAddress IN_CIDR IPs`` (exact addresses are /32 or /128)
``applicationHostname``     ``hostname IN hostNames`` (case-insensitive; the machine's name)
anything else               ``Rule(strategy=name, parameters=...)``: kept, never matches
==========================  ===============================================================
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import orjson
from pydantic import ValidationError

from bastion.flags._model import (
    FLAG_KEY_MAX,
    LENIENT_OPERANDS,
    SINGLE_VALUE_OPERATORS,
    Constraint,
    Flag,
    Operator,
    Prerequisite,
    Rollout,
    Rule,
    Segment,
    Variant,
    VariantOverride,
    VariantPayload,
)

__all__ = [
    "HOSTNAME_FIELD",
    "UNLEASH_FIELDS",
    "flags_from_unleash",
    "is_unleash_export",
    "is_unleash_state",
    "to_unleash",
]

UNLEASH_FIELDS: Final = frozenset(
    {"description", "enabled", "rules", "variants", "prerequisites", "impression_data"}
)
"""The flag fields an Unleash state carries: what importing one may set on an existing
flag (the rest, bastion's own: type, default, tenants, schedule, tags... stay as stored)."""

HOSTNAME_FIELD: Final = "hostname"
"""Context field ``applicationHostname`` rules compare; the engine fills it with the
machine's host name (``FlagSet(hostname=...)``) when a context does not give one."""

_GROUP_STRATEGY: Final = "__internal-strategy-group"
_STICKINESS_OF: Final = {
    "gradualRolloutUserId": "userId",
    "gradualRolloutSessionId": "sessionId",
    "gradualRolloutRandom": "random",
}
_PAYLOAD_TYPES: Final = frozenset({"string", "json", "csv", "number"})
_NEVER_CONTEXT: Final = "unrepresentable"
_WHOLE: Final = 100.0
_EXPORT_PARTS: Final = ("featureStrategies", "featureEnvironments")
_UNSORTED: Final = 9999
"""Unleash's ``sort_order`` column default: where a strategy without one sorts."""


def is_unleash_state(data: Any) -> bool:
    """Whether ``data`` looks like Unleash's client state or export (a ``features`` list)."""
    return isinstance(data, Mapping) and isinstance(data.get("features"), list)


def is_unleash_export(data: Any) -> bool:
    """Whether ``data`` is an Unleash export rather than a client state.

    An export keeps each feature's switch and strategies apart, per environment
    (``featureEnvironments``, ``featureStrategies``); a client state nests them in
    each feature.
    """
    return isinstance(data, Mapping) and any(part in data for part in _EXPORT_PARTS)


def flags_from_unleash(
    state: Mapping[str, Any], *, strict: bool = False, environment: str | None = None
) -> tuple[list[Flag], list[Segment]]:
    """Convert Unleash's client state, or an export, into bastion's flags and segments.

    Args:
        state: ``{"version", "features": [...], "segments": [...]}`` as Unleash's
            ``/api/client/features`` returns it, or an export
            (:func:`is_unleash_export`).
        strict: refuse what lenient reading tolerates (a part that is not of its
            shape, a feature without a name, a value bastion cannot hold, an
            export's segment without its constraints) instead of turning it into
            something that never matches. Unknown operators and custom strategies
            are legitimate Unleash data: both modes keep them (they never match).
        environment: the environment of an export to read when it holds several;
            ignored for a client state (which is one environment's already).

    Returns:
        The flags and segments; leniently, a feature whose name bastion cannot hold
        is left out (so it evaluates as missing: off).

    Raises:
        ValueError: with ``strict``, at the first problem, located
            (``features[3].strategies: must be a list``); in both modes, an export
            holding several environments none of which is ``environment``
            (``featureEnvironments: ...``, naming them).
    """
    reader = _Reader(strict)
    # Parsed JSON is typed by hope only: check what was actually given.
    given: Any = state
    if not isinstance(given, Mapping):
        reader.problem("state", "must be an object")
        return [], []
    if is_unleash_export(state):
        return _from_export(reader, state, environment)
    segments = [
        segment
        for position, raw in enumerate(reader.list(state.get("segments"), "segments"))
        if (segment := _segment(reader, raw, position)) is not None
    ]
    flags = [
        flag
        for position, raw in enumerate(reader.list(state.get("features"), "features"))
        if (flag := _flag(reader, raw, f"features[{position}]")) is not None
    ]
    return flags, segments


class _Reader:
    """Lenient or strict: what a shape problem does (nothing, or a located ``ValueError``)."""

    __slots__ = ("strict",)

    def __init__(self, strict: bool) -> None:
        self.strict = strict

    def problem(self, path: str, message: str) -> None:
        if self.strict:
            raise ValueError(f"{path}: {message}")

    def invalid(self, path: str, exc: ValidationError) -> None:
        """A model refused what was read: strictly, the first reason, located."""
        if self.strict:
            error = exc.errors(include_input=False, include_url=False)[0]
            where = "".join(
                f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]
            )
            message = error["msg"].removeprefix("Value error, ")
            raise ValueError(f"{path}{where}: {message}") from None

    def list(self, value: Any, path: str) -> list[Any]:
        if isinstance(value, (list, tuple)):
            return list(value)
        if value is not None:
            self.problem(path, "must be a list")
        return []

    def mapping(self, value: Any, path: str) -> Mapping[str, Any]:
        if isinstance(value, Mapping):
            return value
        if value is not None:
            self.problem(path, "must be an object")
        return {}


def _lenient_constraint(**fields: Any) -> Constraint:
    """A constraint read as Unleash's SDKs read it: an operand that does not parse never matches."""
    return Constraint.model_validate(fields, context=LENIENT_OPERANDS)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    try:
        if isinstance(value, (int, float)):
            return str(value)
        return orjson.dumps(value).decode()
    except (TypeError, ValueError):
        # orjson refuses integers beyond 64 bits, and str() one of over 4,300 digits: a
        # parameter nobody can mean; as text it matches nothing, it does not raise.
        return ""


def _parameters(reader: _Reader, raw: Any, path: str) -> dict[str, str]:
    return {str(k): _text(v) for k, v in reader.mapping(raw, path).items()}


def _percentage(reader: _Reader, value: Any, path: str) -> float:
    try:
        number = float(str(value).strip().rstrip("%"))
    except ValueError:
        reader.problem(path, "must be a number from 0 to 100")
        return 0.0
    if math.isnan(number):
        reader.problem(path, "must be a number from 0 to 100")
        return 0.0
    return min(100.0, max(0.0, number))


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _never(context: str = _NEVER_CONTEXT) -> Constraint:
    """A constraint that admits no one (``IN`` an empty list)."""
    try:
        return _lenient_constraint(context=context, operator=Operator.IN, values=())
    except ValidationError:
        return _lenient_constraint(context=_NEVER_CONTEXT, operator=Operator.IN, values=())


def _constraint(reader: _Reader, raw: Any, path: str) -> Constraint:
    raw = reader.mapping(raw, path)
    context = _text(raw.get("contextName")).strip()
    if not context:
        reader.problem(f"{path}.contextName", "is missing")
    try:
        operator = Operator(_text(raw.get("operator")))
    except ValueError:
        # Unleash's SDKs answer false for an operator they do not know, inverted or not.
        return _never(context)
    values = tuple(
        _text(v) for v in reader.list(raw.get("values"), f"{path}.values") if v is not None
    )
    value = raw.get("value")
    if operator in SINGLE_VALUE_OPERATORS:
        if value is None:
            reader.problem(
                f"{path}.value", f"{operator} compares against 'value', which is missing"
            )
        value = "" if value is None else _text(value)
    else:
        value = None if value is None else _text(value)
    try:
        return _lenient_constraint(
            context=context,
            operator=operator,
            values=values,
            value=value,
            inverted=bool(raw.get("inverted", False)),
            case_insensitive=bool(raw.get("caseInsensitive", False)),
        )
    except ValidationError as exc:
        reader.invalid(path, exc)
        return _never(context)


def _constraints(reader: _Reader, raw: Any, path: str) -> tuple[Constraint, ...]:
    return tuple(
        _constraint(reader, item, f"{path}[{position}]")
        for position, item in enumerate(reader.list(raw, path))
    )


def _segment_refs(reader: _Reader, raw: Any, path: str) -> tuple[str | int, ...]:
    refs: list[str | int] = []
    for position, item in enumerate(reader.list(raw, path)):
        if isinstance(item, bool):
            reader.problem(f"{path}[{position}]", "must be a segment id or name")
            continue
        if isinstance(item, int):
            refs.append(item)
        elif isinstance(item, str) and item.strip().isdigit():
            refs.append(int(item.strip()))
        elif isinstance(item, str) and item:
            refs.append(item)
        else:
            reader.problem(f"{path}[{position}]", "must be a segment id or name")
    return tuple(refs)


def _segment(reader: _Reader, raw: Any, position: int, *, export: bool = False) -> Segment | None:
    path = f"segments[{position}]"
    raw = reader.mapping(raw, path)
    if export and "constraints" not in raw:
        # Unleash's export names each segment (id, name) without what it holds;
        # read as empty it would admit everyone.
        reader.problem(
            f"{path}.constraints",
            "is missing: Unleash's export names a segment without its constraints; "
            "copy them from Unleash's GET /api/admin/segments into this entry",
        )
        raw = {**raw, "constraints": [{"contextName": _NEVER_CONTEXT, "operator": "IN"}]}
    ident = raw.get("id")
    if ident is not None and (not isinstance(ident, int) or isinstance(ident, bool)):
        reader.problem(f"{path}.id", "must be an integer")
    ident = ident if isinstance(ident, int) and not isinstance(ident, bool) else None
    name = _text(raw.get("name")).strip()
    if not name and ident is None:
        reader.problem(path, "has neither a name nor an id")
    fallback = f"segment-{ident if ident is not None else position}"
    constraints = _constraints(reader, raw.get("constraints"), f"{path}.constraints")
    for candidate in (name, fallback):
        if not candidate:
            continue
        try:
            return Segment(
                name=candidate,
                id=ident,
                description=_text(raw.get("description"))[:2000],
                constraints=constraints,
            )
        except ValidationError as exc:
            reader.invalid(path, exc)
            continue
    return None


def _payload(reader: _Reader, raw: Any, path: str) -> VariantPayload | None:
    if not isinstance(raw, Mapping):
        if raw is not None:
            reader.problem(path, "must be an object")
        return None
    kind = _text(raw.get("type")) or "string"
    if kind not in _PAYLOAD_TYPES:
        reader.problem(f"{path}.type", f"must be one of {', '.join(sorted(_PAYLOAD_TYPES))}")
    return VariantPayload.model_validate(
        {"type": kind if kind in _PAYLOAD_TYPES else "string", "value": _text(raw.get("value"))}
    )


def _weight(reader: _Reader, value: Any, path: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        reader.problem(path, "must be a number from 0 to 1000")
        return 0
    if math.isnan(number):
        reader.problem(path, "must be a number from 0 to 1000")
        return 0
    return int(min(1000.0, max(0.0, number)))


def _variant(reader: _Reader, raw: Any, path: str) -> Variant:
    raw = reader.mapping(raw, path)
    stickiness = _text(raw.get("stickiness")).strip() or "default"
    overrides = []
    for position, item in enumerate(reader.list(raw.get("overrides"), f"{path}.overrides")):
        where = f"{path}.overrides[{position}]"
        override = reader.mapping(item, where)
        context = _text(override.get("contextName")).strip()
        if not context:
            reader.problem(f"{where}.contextName", "is missing")
            continue
        values = reader.list(override.get("values"), f"{where}.values")
        overrides.append(VariantOverride(context=context, values=tuple(map(_text, values))))
    weight_type = _text(raw.get("weightType")) or "variable"
    return Variant(
        name=_text(raw.get("name")),
        weight=_weight(reader, raw.get("weight", 0), f"{path}.weight"),
        weight_type="fix" if weight_type == "fix" else "variable",
        stickiness=stickiness,
        payload=_payload(reader, raw.get("payload"), f"{path}.payload"),
        overrides=tuple(overrides),
    )


def _variants(reader: _Reader, raw: Any, path: str) -> tuple[Variant, ...]:
    variants = []
    for position, item in enumerate(reader.list(raw, path)):
        where = f"{path}[{position}]"
        try:
            variants.append(_variant(reader, item, where))
        except ValidationError as exc:
            reader.invalid(where, exc)
            raise
    return tuple(variants)


def _rules(reader: _Reader, raw: Any, flag_key: str, path: str) -> list[Rule]:
    raw = reader.mapping(raw, path)
    name = _text(raw.get("name"))
    if name == _GROUP_STRATEGY:
        return _group(reader, raw, flag_key, path)
    try:
        return [_rule(reader, raw, flag_key, path)]
    except ValidationError as exc:
        reader.invalid(path, exc)
        return [_opaque(reader, raw, name, path)]
    except (ValueError, TypeError):
        if reader.strict:
            raise
        return [_opaque(reader, raw, name, path)]


def _opaque(reader: _Reader, raw: Mapping[str, Any], name: str, path: str) -> Rule:
    """A strategy bastion cannot express: kept for the export, never matches."""
    try:
        return Rule(
            strategy=name or "unknown",
            parameters=_parameters(reader, raw.get("parameters"), f"{path}.parameters"),
            constraints=_constraints(reader, raw.get("constraints"), f"{path}.constraints"),
            segments=_segment_refs(reader, raw.get("segments"), f"{path}.segments"),
            disabled=bool(raw.get("disabled", False)),
        )
    except ValidationError as exc:
        reader.invalid(path, exc)
        return Rule(strategy=name or "unknown", constraints=(_never(),))


def _rule(reader: _Reader, raw: Mapping[str, Any], flag_key: str, path: str) -> Rule:
    name = _text(raw.get("name")) or "default"
    parameters = _parameters(reader, raw.get("parameters"), f"{path}.parameters")
    constraints = list(_constraints(reader, raw.get("constraints"), f"{path}.constraints"))
    rollout: Rollout | None = None
    where = f"{path}.parameters"
    if name == "default":
        pass
    elif name == "userWithId":
        constraints.append(
            _lenient_constraint(
                context="userId",
                operator=Operator.IN,
                values=tuple(_split(parameters.get("userIds", ""))),
            )
        )
    elif name in _STICKINESS_OF:
        rollout = Rollout(
            percentage=_percentage(
                reader, parameters.get("percentage", "0"), f"{where}.percentage"
            ),
            stickiness=_STICKINESS_OF[name],
            group_id=parameters.get("groupId") or flag_key,
        )
    elif name == "flexibleRollout":
        rollout = Rollout(
            percentage=_percentage(reader, parameters.get("rollout", "0"), f"{where}.rollout"),
            stickiness=parameters.get("stickiness", "").strip() or "default",
            group_id=parameters.get("groupId") or flag_key,
        )
    elif name == "remoteAddress":
        constraints.append(
            _lenient_constraint(
                context="remoteAddress",
                operator=Operator.IN_CIDR,
                values=tuple(_split(parameters.get("IPs", ""))),
            )
        )
    elif name == "applicationHostname":
        constraints.append(
            _lenient_constraint(
                context=HOSTNAME_FIELD,
                operator=Operator.IN,
                values=tuple(h.lower() for h in _split(parameters.get("hostNames", ""))),
                case_insensitive=True,
            )
        )
    else:
        return _opaque(reader, raw, name, path)
    ident = raw.get("id")
    return Rule(
        id=ident if isinstance(ident, str) and ident else None,
        constraints=tuple(constraints),
        segments=_segment_refs(reader, raw.get("segments"), f"{path}.segments"),
        rollout=rollout,
        variants=_variants(reader, raw.get("variants"), f"{path}.variants"),
        disabled=bool(raw.get("disabled", False)),
    )


def _group(reader: _Reader, raw: Mapping[str, Any], flag_key: str, path: str) -> list[Rule]:
    """Unleash's (experimental) strategy groups: ``OR`` is several rules, ``AND`` one."""
    members = [
        rule
        for position, item in enumerate(reader.list(raw.get("group"), f"{path}.group"))
        for rule in _rules(reader, item, flag_key, f"{path}.group[{position}]")
    ]
    if _text(raw.get("operator")).upper() == "OR":
        return members
    if not members or any(member.strategy is not None for member in members):
        return [Rule(strategy=_GROUP_STRATEGY, constraints=(_never(),))]
    rollouts = [
        m.rollout
        for m in members
        if m.rollout is not None
        and not (m.rollout.percentage >= _WHOLE and m.rollout.stickiness in ("default", "random"))
    ]
    # Two partial rollouts in one AND group cannot be one bucket test; the narrower
    # stands for both (exact when they share stickiness and group, as the UI makes them).
    rollout = min(rollouts, key=lambda r: r.percentage) if rollouts else None
    return [
        Rule(
            constraints=tuple(c for m in members for c in m.constraints),
            segments=tuple(s for m in members for s in m.segments),
            rollout=rollout,
            variants=next((m.variants for m in members if m.variants), ()),
        )
    ]


def _prerequisites(
    reader: _Reader, raw: Any, flag_key: str, path: str
) -> tuple[tuple[Prerequisite, ...], bool]:
    """The dependencies, and whether one can never be met (on the flag itself)."""
    prerequisites = []
    impossible = False
    for position, entry in enumerate(reader.list(raw, path)):
        where = f"{path}[{position}]"
        item = reader.mapping(entry, where)
        parent = _text(item.get("feature"))
        if not parent:
            reader.problem(f"{where}.feature", "is missing")
            continue
        if parent == flag_key:
            reader.problem(f"{where}.feature", "a feature cannot depend on itself")
            impossible = True
            continue
        try:
            prerequisites.append(
                Prerequisite(
                    flag=parent,
                    enabled=item.get("enabled", True) is not False,
                    variants=tuple(
                        _text(v) for v in reader.list(item.get("variants"), f"{where}.variants")
                    ),
                )
            )
        except ValidationError as exc:
            # A parent bastion cannot even name does not exist: never satisfied.
            reader.invalid(where, exc)
            impossible = True
    return tuple(prerequisites), impossible


def _flag(reader: _Reader, raw: Any, path: str) -> Flag | None:
    raw = reader.mapping(raw, path)
    key = _key(reader, raw, path)
    if key is None:
        return None
    strategies = reader.list(raw.get("strategies"), f"{path}.strategies")
    return _build_flag(
        reader,
        raw,
        key,
        path,
        enabled=bool(raw.get("enabled", False)),
        strategies=[(item, f"{path}.strategies[{n}]") for n, item in enumerate(strategies)],
        variants=(raw.get("variants"), f"{path}.variants"),
        dependencies=(raw.get("dependencies"), f"{path}.dependencies"),
    )


def _key(reader: _Reader, raw: Mapping[str, Any], path: str) -> str | None:
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        reader.problem(f"{path}.name", "is missing" if name in (None, "") else "must be a string")
    key = _text(name)
    if not key or len(key) > FLAG_KEY_MAX:
        reader.problem(f"{path}.name", f"must be 1 to {FLAG_KEY_MAX} characters")
        return None
    return key


def _build_flag(
    reader: _Reader,
    raw: Mapping[str, Any],
    key: str,
    path: str,
    *,
    enabled: bool,
    strategies: Sequence[tuple[Any, str]],
    variants: tuple[Any, str],
    dependencies: tuple[Any, str],
) -> Flag | None:
    """One flag from a feature's parts, each with the place it was read from."""
    description = _text(raw.get("description"))[:2000]
    try:
        prerequisites, impossible = _prerequisites(reader, dependencies[0], key, dependencies[1])
        return Flag(
            key=key,
            description=description,
            enabled=enabled and not impossible,
            variants=_variants(reader, *variants),
            rules=tuple(
                rule for item, where in strategies for rule in _rules(reader, item, key, where)
            ),
            prerequisites=prerequisites,
            impression_data=bool(raw.get("impressionData", False)),
        )
    except ValidationError as exc:
        reader.invalid(path, exc)
    except (ValueError, TypeError):
        if reader.strict:
            raise
    try:
        # What cannot be read cannot be on: keep the flag (so exports and the admin see
        # it) but switched off.
        return Flag(key=key, description=description, enabled=False)
    except ValidationError as exc:
        reader.invalid(path, exc)
        return None


# --------------------------------------------------------------------- Unleash export


def _from_export(
    reader: _Reader, state: Mapping[str, Any], environment: str | None
) -> tuple[list[Flag], list[Segment]]:
    """An export: each feature put together from the rows about it in one environment.

    Rows about another environment are left out (they are that environment's
    configuration, not this one's); a feature with no ``featureEnvironments`` row in
    it is off there, as Unleash serves it.
    """
    strategies = [
        (reader.mapping(item, f"featureStrategies[{n}]"), f"featureStrategies[{n}]")
        for n, item in enumerate(reader.list(state.get("featureStrategies"), "featureStrategies"))
    ]
    environments = [
        (reader.mapping(item, f"featureEnvironments[{n}]"), f"featureEnvironments[{n}]")
        for n, item in enumerate(
            reader.list(state.get("featureEnvironments"), "featureEnvironments")
        )
    ]
    chosen = _export_environment(reader, strategies, environments, environment)

    def here(row: Mapping[str, Any]) -> bool:
        named = row.get("environment")
        return chosen is None or named is None or named == chosen

    switches: dict[str, tuple[Mapping[str, Any], str]] = {}
    for row, where in environments:
        if here(row):
            switches.setdefault(_text(row.get("featureName") or row.get("name")), (row, where))
    rows = _strategy_rows(reader, state, [(r, w) for r, w in strategies if here(r)])
    dependencies: dict[str, tuple[Any, str]] = {}
    for n, item in enumerate(reader.list(state.get("dependencies"), "dependencies")):
        entry = reader.mapping(item, f"dependencies[{n}]")
        dependencies[_text(entry.get("feature"))] = (
            entry.get("dependencies"),
            f"dependencies[{n}].dependencies",
        )

    flags = []
    names = set()
    for n, item in enumerate(reader.list(state.get("features"), "features")):
        path = f"features[{n}]"
        raw = reader.mapping(item, path)
        key = _key(reader, raw, path)
        if key is None:
            continue
        names.add(key)
        # Unleash neither serves nor imports archived features: they are gone.
        if raw.get("archived") is True:
            continue
        switch, switch_path = switches.get(key, ({}, path))
        listed = rows.get(key, [])
        if not listed and isinstance(switch.get("strategies"), list):
            listed = [
                (s, f"{switch_path}.strategies[{m}]") for m, s in enumerate(switch["strategies"])
            ]
        variants: tuple[Any, str] = (switch.get("variants"), f"{switch_path}.variants")
        if not switch.get("variants") and raw.get("variants"):
            # Exports before Unleash 4.22 kept variants on the feature, for every environment.
            variants = (raw.get("variants"), f"{path}.variants")
        flag = _build_flag(
            reader,
            raw,
            key,
            path,
            enabled=switch.get("enabled") is True,
            strategies=listed,
            variants=variants,
            dependencies=dependencies.get(key, (None, f"{path}.dependencies")),
        )
        if flag is not None:
            flags.append(flag)
    _check_references(reader, names, strategies, environments, state)
    segments = [
        segment
        for position, raw in enumerate(reader.list(state.get("segments"), "segments"))
        if (segment := _segment(reader, raw, position, export=True)) is not None
    ]
    return flags, segments


def _strategy_rows(
    reader: _Reader, state: Mapping[str, Any], strategies: Sequence[tuple[Mapping[str, Any], str]]
) -> dict[str, list[tuple[Mapping[str, Any], str]]]:
    """Each feature's strategies, in Unleash's ``sortOrder`` (ties: as listed)."""
    # The older state export links strategies to segments in a table of its own.
    linked: dict[str, list[Any]] = {}
    links = reader.list(state.get("featureStrategySegments"), "featureStrategySegments")
    for n, item in enumerate(links):
        link = reader.mapping(item, f"featureStrategySegments[{n}]")
        linked.setdefault(_text(link.get("featureStrategyId")), []).append(link.get("segmentId"))
    rows: dict[str, list[tuple[int, int, Mapping[str, Any], str]]] = {}
    for position, (row, where) in enumerate(strategies):
        strategy = dict(row)
        # The older state export names the strategy ``strategyName``.
        strategy.setdefault("name", row.get("strategyName"))
        if "segments" not in strategy and _text(row.get("id")) in linked:
            strategy["segments"] = linked[_text(row.get("id"))]
        order = row.get("sortOrder")
        number = order if isinstance(order, int) and not isinstance(order, bool) else _UNSORTED
        rows.setdefault(_text(row.get("featureName")), []).append(
            (number, position, strategy, where)
        )
    return {
        feature: [(strategy, where) for _, _, strategy, where in sorted(own, key=lambda r: r[:2])]
        for feature, own in rows.items()
    }


def _export_environment(
    reader: _Reader,
    strategies: Sequence[tuple[Mapping[str, Any], str]],
    environments: Sequence[tuple[Mapping[str, Any], str]],
    wanted: str | None,
) -> str | None:
    """The environment to read: ``wanted`` when present, else the only one; ``None``: unnamed."""
    present: dict[str, None] = {}
    unnamed: list[str] = []
    for row, where in (*environments, *strategies):
        named = row.get("environment")
        if named is None:
            unnamed.append(where)
            continue
        if not isinstance(named, str) or not named:
            reader.problem(f"{where}.environment", "must be an environment's name")
            continue
        present[named] = None
    if len(present) > 1 and unnamed:
        # Leniently such a row counts in every environment, the one read included.
        reader.problem(f"{unnamed[0]}.environment", "is missing, and the export holds several")
    if wanted is not None and wanted in present:
        return wanted
    if len(present) == 1:
        return next(iter(present))
    if not present:
        return None
    names = ", ".join(repr(name) for name in present)
    asked = f"none is {wanted!r}" if wanted is not None else "none was chosen"
    # Reading a mix of environments would switch flags on where they are off: refuse,
    # strict or not.
    raise ValueError(
        f"featureEnvironments: the export holds the environments {names} and {asked}; "
        "set flags.environment to the one to import, or export a single environment"
    )


def _check_references(
    reader: _Reader,
    names: set[str],
    strategies: Sequence[tuple[Mapping[str, Any], str]],
    environments: Sequence[tuple[Mapping[str, Any], str]],
    state: Mapping[str, Any],
) -> None:
    """Strictly, rows about features the export does not hold are mistakes, not data."""
    if not reader.strict:
        return
    for row, where in (*strategies, *environments):
        feature = _text(row.get("featureName") or row.get("name"))
        if feature not in names and row.get("featureName") is not None:
            reader.problem(f"{where}.featureName", f"{feature!r} is not among the features")
    for n, item in enumerate(reader.list(state.get("dependencies"), "dependencies")):
        feature = _text(reader.mapping(item, f"dependencies[{n}]").get("feature"))
        if feature not in names:
            reader.problem(f"dependencies[{n}].feature", f"{feature!r} is not among the features")


# --------------------------------------------------------------------- export


def to_unleash(flags: Iterable[Flag], segments: Iterable[Segment] = ()) -> dict[str, Any]:
    """Bastion's flags and segments in Unleash's client-state shape (``version`` 2).

    Bastion-only parts have no Unleash form and are left out: tenant overrides,
    the schedule (the switch is exported as it is stored), ``client_visible``,
    the flag's ``type`` and ``default`` (variants carry the values as payloads).
    Segments without an Unleash id get the next free ones.
    """
    segment_list = list(segments)
    used = {s.id for s in segment_list if s.id is not None}
    next_id = max(used, default=0) + 1
    ids: dict[str | int, int] = {}
    exported_segments = []
    for segment in segment_list:
        ident = segment.id
        if ident is None:
            while next_id in used:
                next_id += 1
            ident = next_id
            used.add(ident)
        ids[segment.name] = ident
        ids[ident] = ident
        exported_segments.append(
            {
                "id": ident,
                "name": segment.name,
                "description": segment.description,
                "constraints": [_constraint_out(c) for c in segment.constraints],
            }
        )
    return {
        "version": 2,
        "features": [_flag_out(flag, ids) for flag in flags],
        "segments": exported_segments,
    }


def _constraint_out(constraint: Constraint) -> dict[str, Any]:
    out: dict[str, Any] = {
        "contextName": constraint.context,
        "operator": str(constraint.operator),
        "values": list(constraint.values),
        "inverted": constraint.inverted,
        "caseInsensitive": constraint.case_insensitive,
    }
    if constraint.value is not None:
        out["value"] = constraint.value
    return out


def _variant_out(variant: Variant) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": variant.name,
        "weight": variant.weight,
        "weightType": variant.weight_type,
        "stickiness": variant.stickiness,
    }
    if variant.payload is not None:
        out["payload"] = {"type": variant.payload.type, "value": variant.payload.value}
    if variant.overrides:
        out["overrides"] = [
            {"contextName": o.context, "values": list(o.values)} for o in variant.overrides
        ]
    return out


def _percentage_out(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _rule_out(flag: Flag, rule: Rule, ids: Mapping[str | int, int]) -> dict[str, Any]:
    constraints: Sequence[Constraint] = rule.constraints
    parameters: dict[str, str]
    if rule.strategy is not None:
        name, parameters = rule.strategy, dict(rule.parameters)
    elif rule.rollout is not None:
        name = "flexibleRollout"
        parameters = {
            "rollout": _percentage_out(rule.rollout.percentage),
            "stickiness": rule.rollout.stickiness,
            "groupId": rule.rollout.group_id or flag.key,
        }
    elif (
        len(constraints) == 1
        and constraints[0].context == HOSTNAME_FIELD
        and constraints[0].operator is Operator.IN
        and not constraints[0].inverted
    ):
        # The SDKs read the machine's name only through this strategy, not a constraint.
        name, parameters = "applicationHostname", {"hostNames": ",".join(constraints[0].values)}
        constraints = ()
    else:
        name, parameters = "default", {}
    variants = rule.variants
    if rule.variant is not None:
        fixed = next((v for v in (*rule.variants, *flag.variants) if v.name == rule.variant), None)
        variants = () if fixed is None else (fixed.model_copy(update={"weight": 1000}),)
    if any(s not in ids and not isinstance(s, int) for s in rule.segments):
        # A segment Unleash cannot cite never matches: keep the rule as unable to match.
        constraints = (*constraints, _never())
    out: dict[str, Any] = {
        "name": name,
        "parameters": parameters,
        "constraints": [_constraint_out(c) for c in constraints],
        "segments": [ids.get(s, s) for s in rule.segments if s in ids or isinstance(s, int)],
        "variants": [_variant_out(v) for v in variants],
    }
    if rule.id is not None:
        out["id"] = rule.id
    if rule.disabled:
        out["disabled"] = True
    return out


def _flag_out(flag: Flag, ids: Mapping[str | int, int]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": flag.key,
        "description": flag.description,
        "type": "release" if not flag.variants else "experiment",
        "enabled": flag.enabled,
        "stale": False,
        "impressionData": flag.impression_data,
        "strategies": [_rule_out(flag, rule, ids) for rule in flag.rules],
        "variants": [_variant_out(v) for v in flag.variants],
    }
    if flag.prerequisites:
        out["dependencies"] = [
            {"feature": p.flag, "enabled": p.enabled, "variants": list(p.variants)}
            for p in flag.prerequisites
        ]
    return out
