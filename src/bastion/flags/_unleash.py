"""Unleash's client state (``/api/client/features``) to bastion's flag models, and back.

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


def is_unleash_state(data: Any) -> bool:
    """Whether ``data`` looks like Unleash's client state or export (a ``features`` list)."""
    return isinstance(data, Mapping) and isinstance(data.get("features"), list)


def flags_from_unleash(
    state: Mapping[str, Any], *, strict: bool = False
) -> tuple[list[Flag], list[Segment]]:
    """Convert Unleash's client state into bastion's flags and segments.

    Args:
        state: ``{"version", "features": [...], "segments": [...]}`` as Unleash's
            ``/api/client/features`` returns it (an export's ``features`` and
            ``segments`` too).
        strict: refuse what lenient reading tolerates (a part that is not of its
            shape, a feature without a name, a value bastion cannot hold) instead of
            turning it into something that never matches. Unknown operators and
            custom strategies are legitimate Unleash data: both modes keep them (they
            never match).

    Returns:
        The flags and segments; leniently, a feature whose name bastion cannot hold
        is left out (so it evaluates as missing: off).

    Raises:
        ValueError: with ``strict``, at the first problem, located
            (``features[3].strategies: must be a list``).
    """
    reader = _Reader(strict)
    # Parsed JSON is typed by hope only: check what was actually given.
    given: Any = state
    if not isinstance(given, Mapping):
        reader.problem("state", "must be an object")
        return [], []
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


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return orjson.dumps(value).decode()


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
        return Constraint(context=context, operator=Operator.IN, values=())
    except ValidationError:
        return Constraint(context=_NEVER_CONTEXT, operator=Operator.IN, values=())


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
        return Constraint(
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


def _segment(reader: _Reader, raw: Any, position: int) -> Segment | None:
    path = f"segments[{position}]"
    raw = reader.mapping(raw, path)
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
            Constraint(
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
            Constraint(
                context="remoteAddress",
                operator=Operator.IN_CIDR,
                values=tuple(_split(parameters.get("IPs", ""))),
            )
        )
    elif name == "applicationHostname":
        constraints.append(
            Constraint(
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
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        reader.problem(f"{path}.name", "is missing" if name in (None, "") else "must be a string")
    key = _text(name)
    if not key or len(key) > FLAG_KEY_MAX:
        reader.problem(f"{path}.name", f"must be 1 to {FLAG_KEY_MAX} characters")
        return None
    description = _text(raw.get("description"))[:2000]
    try:
        prerequisites, impossible = _prerequisites(
            reader, raw.get("dependencies"), key, f"{path}.dependencies"
        )
        return Flag(
            key=key,
            description=description,
            enabled=bool(raw.get("enabled", False)) and not impossible,
            variants=_variants(reader, raw.get("variants"), f"{path}.variants"),
            rules=tuple(
                rule
                for position, item in enumerate(
                    reader.list(raw.get("strategies"), f"{path}.strategies")
                )
                for rule in _rules(reader, item, key, f"{path}.strategies[{position}]")
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
