"""Compiled flag sets: each flag compiled once into closures, evaluated in about a microsecond.

:class:`FlagSet` is an immutable snapshot. Compiling does everything that does
not depend on the context: the kill switch as the schedule sets it now,
prerequisites resolved to their compiled parents, segments resolved and
compiled once, constraints compiled into predicates (:mod:`._constraints`),
rollout group prefixes, variant tables, and every outcome an evaluation can
reach as a ready-made tuple. Evaluating a flag is then a few dict lookups,
predicate calls and at most two MurmurHash3 calls; no pydantic object is
touched.

The maths is Unleash's, so that a user gets the same answer from bastion as
from an Unleash SDK:

* rollout bucket: ``murmur3_32("<group>:<stickiness value>", seed=0) % 100 + 1``,
  admitted when ``percentage > 0`` and the bucket is at most the percentage;
* variant pick: ``murmur3_32("<group>:<stickiness value>", seed=86028157) % total + 1``
  walked through the variants' cumulative weights.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import random
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, NamedTuple

import mmh3
import structlog

from bastion.flags._constraints import (
    NEVER,
    Predicate,
    RegexTimeout,
    compile_constraint,
    text_of,
)
from bastion.flags._evaluation import Evaluation, EvaluationContext, Reason
from bastion.flags._model import Constraint, Flag, FlagType, Rule, Segment, Variant
from bastion.flags._unleash import HOSTNAME_FIELD, flags_from_unleash

__all__ = ["DISABLED_VARIANT", "FlagSet", "normalized_hash", "variant_hash"]

logger = structlog.get_logger("bastion.flags")

VARIANT_SEED: Final = 86028157
"""Unleash's seed for variant hashing (rollout buckets use seed 0)."""
DISABLED_VARIANT: Final = "disabled"
"""The variant name Unleash gives when no variant is served."""
_LOGGED_KEYS_MAX: Final = 10_000
_LOGGED_KEY_CHARS: Final = 200
_LOG_INTERVAL: Final = 60.0
"""Seconds between two error lines about one flag: a broken flag on a hot path
must not flood the logs."""

Context = EvaluationContext | Mapping[str, Any] | None
_NO_DEFAULT: Any = object()
_EMPTY: Final[Mapping[str, Any]] = {}
UNKNOWN_KEY: Final = "<unknown>"
_last_logged: dict[str, float] = {}


def normalized_hash(group: str, value: str, *, modulus: int = 100, seed: int = 0) -> int:
    """Unleash's normalisation: ``murmur3_32(f"{group}:{value}", seed) % modulus + 1``."""
    return int(mmh3.hash(f"{group}:{value}", seed, signed=False)) % modulus + 1


def variant_hash(group: str, value: str, total: int) -> int:
    """Unleash's variant target for ``value`` among weights summing to ``total``."""
    return normalized_hash(group, value, modulus=total, seed=VARIANT_SEED)


def _log_error(key: str, code: str, message: str, *, known: bool = True) -> None:
    """Log an evaluation error, at most once a minute per flag, without context values.

    ``known=False`` (a key the set does not hold: the caller chose it) logs under the
    one "<unknown>" slot, so made-up keys cannot fill the table real flags need.
    """
    moment = time.monotonic()
    # Bounded: keys are flag keys, and once the table is full new ones share the one
    # "<unknown>" slot (and its once a minute).
    if not known or (key not in _last_logged and len(_last_logged) >= _LOGGED_KEYS_MAX):
        slot = UNKNOWN_KEY
    else:
        slot = key
    if moment - _last_logged.get(slot, -_LOG_INTERVAL) >= _LOG_INTERVAL:
        _last_logged[slot] = moment
        shown = key if len(key) <= _LOGGED_KEY_CHARS else key[:_LOGGED_KEY_CHARS] + "…"
        logger.warning("flags.evaluation_error", flag=shown, error_code=code, error=message)


class _NotCompiled(Exception):
    """The flag could not be compiled: every evaluation of it is an ``ERROR``."""


def _failure(key: str, exc: Exception) -> tuple[str, str]:
    """The OpenFeature error code and message for a failed evaluation, logged with that code.

    One classification for every entry point, so the log line and the
    :class:`Evaluation` (and the counted reason) always agree.
    """
    if isinstance(exc, RegexTimeout):
        code, message = "GENERAL", RegexTimeout.MESSAGE
    elif isinstance(exc, _NotCompiled):
        code, message = "PARSE_ERROR", "the flag could not be compiled"
    elif isinstance(exc, (TypeError, AttributeError)):
        # What a malformed context (or a context value of an unusable type) raises.
        code, message = "PARSE_ERROR", f"malformed context: {type(exc).__name__}"
    else:
        code, message = "GENERAL", f"evaluation failed: {type(exc).__name__}"
    _log_error(key, code, message)
    return code, message


def _flat(context: Context) -> Mapping[str, Any]:
    """The context as one dict of canonical names (the hot path: no copy when avoidable)."""
    if context.__class__ is not dict:
        if context is None:
            return _EMPTY
        if isinstance(context, EvaluationContext):
            return context.flat()
        if not isinstance(context, Mapping):
            raise TypeError("a context is a mapping or an EvaluationContext")
    properties = context.get("properties")
    if not properties:
        # Unleash's top-level names are already the canonical ones: use the dict as is.
        return context
    if properties.__class__ is dict and context.__class__ is dict:
        # The top-level fields win over properties of the same name; ``|`` is the
        # quickest merge of two dicts.
        merged: dict[str, Any] = properties | context
        return merged
    if not isinstance(properties, Mapping):
        raise TypeError("the context's 'properties' must be an object")
    return {**properties, **context}


# --------------------------------------------------------------------- compiled pieces


class _Variants:
    """A compiled variant table: overrides, weights, stickiness and hash group."""

    __slots__ = (
        "count",
        "fields",
        "names",
        "overrides",
        "payloads",
        "prefix",
        "stickiness",
        "table",
        "total",
        "values",
    )

    def __init__(self, variants: Sequence[Variant], group: str) -> None:
        self.names = tuple(v.name for v in variants)
        self.values = tuple(v.value for v in variants)
        self.payloads = tuple(
            None if v.payload is None else (v.payload.type, v.payload.value) for v in variants
        )
        self.total = sum(v.weight for v in variants)
        # (cumulative weight, index) for the walk; zero weights are never served.
        table = []
        running = 0
        for index, variant in enumerate(variants):
            if variant.weight > 0:
                running += variant.weight
                table.append((running, index))
        self.table = tuple(table)
        self.count = len(table)
        self.overrides = tuple(
            (override.context, frozenset(override.values), index)
            for index, variant in enumerate(variants)
            for override in variant.overrides
        )
        self.stickiness = variants[0].stickiness if variants else "default"
        self.fields: tuple[str, ...] = (
            ("userId", "sessionId", "remoteAddress")
            if self.stickiness == "default"
            else (self.stickiness,)
        )
        self.prefix = f"{group}:"

    def pick(self, context: Mapping[str, Any]) -> int | None:
        """The variant served: its index, ``-(index + 1)`` when an override chose it.

        ``None`` when none is (no weight to share).
        """
        if self.total <= 0 or not self.table:
            return None
        for field, values, index in self.overrides:
            value = context.get(field)
            if value is not None and text_of(value) in values:
                return -(index + 1)
        if self.count == 1:
            return self.table[0][1]
        seed = None
        for field in self.fields:
            value = context.get(field)
            if value:
                seed = text_of(value)
                if seed:
                    break
        if not seed:
            seed = str(random.random())  # noqa: S311 -- Unleash's random stickiness, not a secret
        target = mmh3.hash(self.prefix + seed, VARIANT_SEED, signed=False) % self.total + 1
        for cumulative, index in self.table:
            if cumulative >= target:
                return index
        return self.table[-1][1]


class _Outcome:
    """Where an evaluation lands, with every answer it can give made at compile time.

    An evaluation returns one of these ready (frozen, shareable) :class:`Evaluation`
    objects: building one per call would cost more than the evaluation itself.
    """

    __slots__ = (
        "answer",
        "by_override",
        "by_weight",
        "counted",
        "enabled",
        "fixed",
        "overridable",
        "reason",
        "rule",
        "split",
        "variants",
    )

    def __init__(  # noqa: PLR0917 -- a record, built in one place
        self,
        enabled: bool,
        reason: Reason,
        rule: str | None,
        variants: _Variants | None = None,
        fixed: int | None = None,
        split: bool = False,
    ) -> None:
        self.enabled = enabled
        self.reason = reason
        self.rule = rule
        self.variants = variants if enabled else None
        self.fixed = fixed
        self.split = split
        """A partial rollout admitted the context."""
        self.answer: Evaluation = _PLACEHOLDER
        """The answer when no variant is served (or the fixed variant's)."""
        self.by_weight: tuple[Evaluation, ...] = ()
        self.by_override: tuple[Evaluation, ...] = ()
        self.counted: Reason = self.reason
        """The reason :meth:`evaluation` gives, known without picking a variant (unless
        ``overridable``): what ``is_enabled`` counts, so both count alike."""
        self.overridable: _Variants | None = None
        """Variants whose overrides may turn the weighted pick into a targeting match."""

    def prepare(self, key: str, boolean: bool, default: Any) -> _Outcome:
        """Make the answers (once the flag's key, type and default are known)."""
        reason = Reason.SPLIT if self.split else self.reason
        enabled = self.enabled
        variants = self.variants

        def answer(index: int | None, reason: Reason, rule: str | None) -> Evaluation:
            if index is None or variants is None:
                value = enabled if boolean else default
                return Evaluation(key, value, None, reason, rule, enabled=enabled)
            value = enabled if boolean else variants.values[index]
            return Evaluation(key, value, variants.names[index], reason, rule, enabled=enabled)

        if variants is not None and self.fixed is not None:
            self.answer = answer(self.fixed, reason, self.rule)
        else:
            self.answer = answer(None, reason, self.rule)
        self.counted = self.answer.reason
        if variants is not None:
            weighted = Reason.SPLIT if variants.count > 1 else reason
            self.by_weight = tuple(
                answer(i, weighted, self.rule) for i in range(len(variants.names))
            )
            self.by_override = tuple(
                answer(i, Reason.TARGETING_MATCH, "variant-override")
                for i in range(len(variants.names))
            )
            if self.fixed is None and variants.total > 0 and variants.table:
                # What :meth:`_Variants.pick` would do, short of hashing.
                self.counted = weighted
                if variants.overrides:
                    self.overridable = variants
        return self

    def counted_reason(self, context: Mapping[str, Any]) -> Reason:
        """The reason :meth:`evaluation` would give for ``context``, without the weighted pick."""
        variants = self.overridable
        if variants is None:
            return self.counted
        for field, values, _ in variants.overrides:
            value = context.get(field)
            if value is not None and text_of(value) in values:
                return Reason.TARGETING_MATCH
        return self.counted

    def evaluation(self, context: Mapping[str, Any]) -> Evaluation:
        """The answer for a context this outcome was reached with."""
        variants = self.variants
        if variants is None or self.fixed is not None:
            return self.answer
        index = variants.pick(context)
        if index is None:
            return self.answer
        if index < 0:
            return self.by_override[-index - 1]
        return self.by_weight[index]

    def picked(self, context: Mapping[str, Any]) -> int | None:
        """The index of the variant served, ``None`` when none."""
        variants = self.variants
        if variants is None:
            return None
        if self.fixed is not None:
            return self.fixed
        index = variants.pick(context)
        if index is None:
            return None
        return -index - 1 if index < 0 else index


_PLACEHOLDER: Final = Evaluation("", None, None, Reason.ERROR)


class _CompiledRule(NamedTuple):
    name: str
    rule: Rule
    check: Predicate | None
    """All constraints and segments at once; ``None``: nothing to check."""
    admit: Predicate | None
    """The rollout; ``None``: everyone the check lets through."""
    outcome: _Outcome
    constraints: tuple[tuple[Constraint, Predicate], ...]
    segments: tuple[tuple[str | int, Predicate | None], ...]


def _all(predicates: Sequence[Predicate]) -> Predicate | None:
    """One predicate for a conjunction; specialised for the common short ones."""
    if not predicates:
        return None
    if len(predicates) == 1:
        return predicates[0]
    if len(predicates) == 2:  # noqa: PLR2004 -- the common shape, unrolled
        first, second = predicates

        def both(context: Mapping[str, Any]) -> bool:
            return first(context) and second(context)

        return both
    predicates = tuple(predicates)

    def every(context: Mapping[str, Any]) -> bool:
        return all(predicate(context) for predicate in predicates)

    return every


def _rollout_admit(
    percentage: float, stickiness: str, group: str, defaults: Mapping[str, Any]
) -> Predicate | None:
    """The rollout predicate; ``None`` when it admits everyone."""
    if percentage <= 0:
        return NEVER
    prefix = f"{group}:"
    hash32 = mmh3.hash
    if stickiness == "random":
        if percentage >= 100:  # noqa: PLR2004 -- the whole population
            return None

        def by_chance(context: Mapping[str, Any]) -> bool:
            return random.randint(1, 100) <= percentage  # noqa: S311 -- a rollout draw

        return by_chance
    if stickiness == "default":
        if percentage >= 100:  # noqa: PLR2004 -- falls back to random: everyone
            return None

        def by_default(context: Mapping[str, Any]) -> bool:
            value = context.get("userId") or context.get("sessionId")
            if value is None:
                return random.randint(1, 100) <= percentage  # noqa: S311 -- Unleash's fallback
            if value.__class__ is not str:
                value = text_of(value)
                if not value:
                    return random.randint(1, 100) <= percentage  # noqa: S311 -- as above
            return hash32(prefix + value, 0, signed=False) % 100 + 1 <= percentage

        return by_default
    default = defaults.get(stickiness)

    def by_field(context: Mapping[str, Any]) -> bool:
        value = context.get(stickiness, default)
        if value.__class__ is not str:
            value = text_of(value)
        if not value:
            return False
        return hash32(prefix + value, 0, signed=False) % 100 + 1 <= percentage

    return by_field


class _CompiledFlag:
    """One flag, compiled: ``decide`` finds the outcome, ``evaluate`` adds the variant."""

    __slots__ = (
        "boolean",
        "decide",
        "default",
        "enabled",
        "flag",
        "flag_variants",
        "key",
        "prerequisites",
        "rules",
        "tenants",
    )

    def __init__(self, flag: Flag) -> None:
        self.flag = flag
        if not isinstance(flag.key, str):
            raise TypeError("a flag's key is a string")
        self.key = flag.key
        self.boolean = flag.type is FlagType.BOOLEAN
        self.default = flag.default
        self.enabled = False
        self.flag_variants: _Variants | None = None
        self.rules: tuple[_CompiledRule, ...] = ()
        self.prerequisites: tuple[tuple[str, _CompiledFlag | None, bool, frozenset[str]], ...] = ()
        self.tenants: dict[str, _Outcome] = {}
        self.decide: Callable[[Mapping[str, Any]], _Outcome] = _broken(flag.key)

    def variant_name(self, context: Mapping[str, Any], outcome: _Outcome) -> str:
        """The name Unleash's ``getVariant`` gives (``disabled`` when none is served)."""
        index = outcome.picked(context)
        variants = outcome.variants
        return DISABLED_VARIANT if index is None or variants is None else variants.names[index]


class FlagSet:
    """An immutable, compiled snapshot of flags and segments.

    Build one with :meth:`from_flags` (bastion's models) or :meth:`from_unleash`
    (Unleash's client state), then evaluate with :meth:`is_enabled`,
    :meth:`variant`, :meth:`evaluate` or :meth:`explain`. Evaluation never raises:
    a missing flag, a malformed context or a failure inside a flag gives reason
    ``ERROR`` and the default, and is logged (once a minute per flag).

    Example:
        >>> flags = FlagSet.from_unleash({"features": [
        ...     {"name": "beta", "enabled": True, "strategies": [{"name": "default"}]}]})
        >>> flags.is_enabled("beta", {"userId": "42"})
        True

    Attributes:
        revision: the store revision this snapshot was compiled from.
        next_change_at: the earliest scheduled change after compile time; the runtime
            compiles a new set then. ``None`` when nothing is scheduled.
    """

    __slots__ = (
        "_client_visible",
        "_compiled",
        "_options",
        "_segments",
        "next_change_at",
        "regex_timeouts",
        "revision",
    )

    def __init__(self) -> None:
        self._compiled: dict[str, _CompiledFlag] = {}
        self._segments: tuple[Segment, ...] = ()
        self._client_visible: tuple[str, ...] = ()
        self._options: dict[str, Any] = {}
        self.revision = 0
        self.next_change_at: dt.datetime | None = None
        self.regex_timeouts = 0
        """How many REGEX searches hit the time bound (each ends its evaluation with ``ERROR``)."""

    # ----------------------------------------------------------------- building

    @classmethod
    def from_flags(
        cls,
        flags: Iterable[Flag],
        segments: Iterable[Segment] = (),
        *,
        revision: int = 0,
        now: dt.datetime | None = None,
        environment: str | None = None,
        app_name: str | None = None,
        regex_timeout: float = 0.005,
        hostname: str | None = None,
    ) -> FlagSet:
        """Compile bastion's flags and segments.

        Args:
            flags: the flags (their keys are unique; a later one replaces an earlier).
            segments: the segments rules refer to, by name or Unleash id.
            revision: the store revision, carried along for ETags and metrics.
            now: the moment the kill switches are read at (default: now).
            environment: ``environment`` of contexts that give none.
            app_name: ``appName`` of contexts that give none.
            regex_timeout: seconds one ``REGEX`` search may take.
            hostname: what ``applicationHostname`` rules compare (default: ``$HOSTNAME``,
                else the machine's name, as Unleash's SDKs).

        Returns:
            The compiled set.
        """
        self = cls()
        self.revision = revision
        moment = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
        if hostname is None:
            hostname = os.environ.get("HOSTNAME") or socket.gethostname()
        defaults: dict[str, Any] = {HOSTNAME_FIELD: hostname.lower()}
        if environment is not None:
            defaults["environment"] = environment
        if app_name is not None:
            defaults["appName"] = app_name
        self._options = {
            "environment": environment,
            "app_name": app_name,
            "regex_timeout": regex_timeout,
            "hostname": hostname,
            "now": moment,
        }
        self._segments = tuple(segments)
        compiler = _Compiler(self, defaults, regex_timeout, self._segments)
        for flag in flags:
            try:
                self._compiled[flag.key] = _CompiledFlag(flag)
            except Exception as exc:  # noqa: BLE001 -- a flag without a usable key cannot be served
                _log_error(UNKNOWN_KEY, "PARSE_ERROR", f"unreadable flag: {type(exc).__name__}")
        upcoming: list[dt.datetime] = []
        visible: list[str] = []
        for compiled in self._compiled.values():
            try:
                compiler.compile(compiled, moment)
                upcoming.extend(c.at for c in compiled.flag.schedule if c.at > moment)
                if compiled.flag.client_visible:
                    visible.append(compiled.key)
            except Exception as exc:  # noqa: BLE001 -- one broken flag must not sink the set
                _log_error(compiled.key, "PARSE_ERROR", f"cannot compile: {type(exc).__name__}")
                compiled.decide = _broken(compiled.key)
        self._client_visible = tuple(visible)
        self.next_change_at = min(upcoming, default=None)
        return self

    @classmethod
    def from_unleash(cls, state: Mapping[str, Any], **options: Any) -> FlagSet:
        """Compile Unleash's client state (``/api/client/features``, segments included).

        An Unleash export (``featureStrategies``, ``featureEnvironments``) is read too,
        for ``environment`` when it holds several.

        This is the entry point the Unleash conformance suite and operators' scripts
        use; contexts are then Unleash's shape (``userId``, ``sessionId``,
        ``remoteAddress``, ``environment``, ``appName``, ``currentTime``,
        ``properties``) and :meth:`variant` answers as Unleash's SDKs do.

        Args:
            state: the client state.
            **options: as :meth:`from_flags` (``revision``, ``now``, ``environment``,
                ``app_name``, ``regex_timeout``, ``hostname``).

        Returns:
            The compiled set.
        """
        flags, segments = flags_from_unleash(state, environment=options.get("environment"))
        return cls.from_flags(flags, segments, **options)

    # ----------------------------------------------------------------- reading

    def keys(self) -> list[str]:
        """The flags' keys, in the order they were given."""
        return list(self._compiled)

    def __contains__(self, name: object) -> bool:
        return name in self._compiled

    def __len__(self) -> int:
        return len(self._compiled)

    def flag(self, name: str) -> Flag | None:
        """The flag's model (as compiled), ``None`` when there is no such flag."""
        compiled = self._compiled.get(name)
        return None if compiled is None else compiled.flag

    def flags(self) -> list[Flag]:
        """Every flag's model, in order."""
        return [compiled.flag for compiled in self._compiled.values()]

    def client_visible_keys(self) -> tuple[str, ...]:
        """The keys of the flags served to front ends (``client_visible``)."""
        return self._client_visible

    def segments(self) -> list[Segment]:
        """The segments the set was compiled with."""
        return list(self._segments)

    @property
    def options(self) -> dict[str, Any]:
        """The compile options (``environment``, ``app_name``, ``regex_timeout``...)."""
        return dict(self._options)

    # ----------------------------------------------------------------- evaluating

    def is_enabled(self, name: str, context: Context = None) -> bool:
        """Whether the flag is on for the context (``False`` for a missing flag).

        Args:
            name: the flag's key.
            context: Unleash's context shape, or an :class:`EvaluationContext`.
        """
        compiled = self._compiled.get(name)
        if compiled is None:
            return False
        try:
            return compiled.decide(_flat(context)).enabled
        except Exception as exc:  # noqa: BLE001 -- evaluation never raises into the caller
            _failure(name, exc)
            return False

    def decide(self, name: str, context: Context = None) -> tuple[bool, Reason]:
        """Whether the flag is on and why, without picking a variant (the counted fast path).

        The reason is the one :meth:`evaluate` gives for the same flag and context
        (``SPLIT`` when a partial rollout admitted it or a weighted pick would serve a
        variant). A missing flag or a failure gives ``(False, ERROR)``.
        """
        compiled = self._compiled.get(name)
        if compiled is None:
            return False, Reason.ERROR
        try:
            flat = _flat(context)
            outcome = compiled.decide(flat)
            if outcome.overridable is None:
                return outcome.enabled, outcome.counted
            return outcome.enabled, outcome.counted_reason(flat)
        except Exception as exc:  # noqa: BLE001 -- evaluation never raises into the caller
            _failure(name, exc)
            return False, Reason.ERROR

    def variant(self, name: str, context: Context = None) -> dict[str, Any]:
        """The variant served, as Unleash's SDKs return it.

        Returns:
            ``{"name", "payload" (when the variant has one), "enabled", "feature_enabled"}``;
            ``{"name": "disabled", "enabled": False, "feature_enabled": ...}`` when the
            flag is off or serves no variant.
        """
        compiled = self._compiled.get(name)
        if compiled is None:
            return {"name": DISABLED_VARIANT, "enabled": False, "feature_enabled": False}
        try:
            flat = _flat(context)
            outcome = compiled.decide(flat)
            index = outcome.picked(flat)
        except Exception as exc:  # noqa: BLE001 -- evaluation never raises into the caller
            _failure(name, exc)
            return {"name": DISABLED_VARIANT, "enabled": False, "feature_enabled": False}
        table = outcome.variants
        if index is None or table is None:
            return {"name": DISABLED_VARIANT, "enabled": False, "feature_enabled": outcome.enabled}
        result: dict[str, Any] = {"name": table.names[index]}
        payload = table.payloads[index]
        if payload is not None:
            result["payload"] = {"type": payload[0], "value": payload[1]}
        result["enabled"] = True
        result["feature_enabled"] = True
        return result

    def evaluate(
        self, name: str, context: Context = None, *, default: Any = _NO_DEFAULT
    ) -> Evaluation:
        """The flag's full answer: value, variant, reason and the rule that decided.

        Args:
            name: the flag's key.
            context: Unleash's context shape, or an :class:`EvaluationContext`.
            default: served on ``ERROR`` (and when the flag has no default of its own);
                omitted: the flag's default (``None`` for a missing flag).
        """
        compiled = self._compiled.get(name)
        if compiled is None:
            return Evaluation(
                key=name,
                value=None if default is _NO_DEFAULT else default,
                variant=None,
                reason=Reason.ERROR,
                error_code="FLAG_NOT_FOUND",
                error_message=f"no flag {name!r}",
            )
        try:
            flat = _flat(context)
            evaluation = compiled.decide(flat).evaluation(flat)
        except Exception as exc:  # noqa: BLE001 -- evaluation never raises into the caller
            code, message = _failure(name, exc)
            fallback = compiled.default if default is _NO_DEFAULT else default
            return Evaluation(
                key=name,
                value=fallback,
                variant=None,
                reason=Reason.ERROR,
                error_code=code,
                error_message=message,
            )
        if evaluation.value is None and default is not _NO_DEFAULT:
            return dataclasses.replace(evaluation, value=default)
        return evaluation

    def explain(self, name: str, context: Context = None) -> dict[str, Any]:
        """A JSON-able account of an evaluation: the answer and why, step by step.

        The steps are the kill switch, each prerequisite, the tenant override, each
        rule tried (which constraint, segment or rollout turned it down) and the
        variant pick. Context values appear only as the rollout bucket they hash to.
        """
        evaluation = self.evaluate(name, context)
        compiled = self._compiled.get(name)
        answer: dict[str, Any] = {
            "flag": name,
            "revision": self.revision,
            "evaluation": _evaluation_json(evaluation),
            "steps": [],
        }
        if compiled is None:
            return answer
        try:
            answer["steps"] = _explain_steps(compiled, _flat(context), evaluation)
        except Exception as exc:  # noqa: BLE001 -- an explanation never raises either
            answer["steps"].append({"step": "error", "error": type(exc).__name__})
        return answer


def _broken(key: str) -> Callable[[Mapping[str, Any]], _Outcome]:
    def decide(context: Mapping[str, Any]) -> _Outcome:
        raise _NotCompiled(key)

    return decide


class _Compiler:
    """Compiles flags of one set (shares segments and settings between them)."""

    def __init__(
        self,
        flag_set: FlagSet,
        defaults: Mapping[str, Any],
        regex_timeout: float,
        segments: Sequence[Segment],
    ) -> None:
        self.flag_set = flag_set
        self.defaults = defaults
        self.regex_timeout = regex_timeout
        self.by_name = {s.name: s for s in segments}
        self.by_id = {s.id: s for s in segments if s.id is not None}
        self.segment_predicates: dict[str, Predicate] = {}

    @staticmethod
    def outcome(  # noqa: PLR0917 -- the outcome's fields, as _Outcome
        compiled: _CompiledFlag,
        enabled: bool,
        reason: Reason,
        rule: str | None,
        variants: _Variants | None = None,
        fixed: int | None = None,
        split: bool = False,
    ) -> _Outcome:
        outcome = _Outcome(enabled, reason, rule, variants, fixed, split)
        return outcome.prepare(compiled.key, compiled.boolean, compiled.default)

    def constraint(self, key: str, constraint: Constraint) -> Predicate:
        flag_set = self.flag_set

        def on_error(message: str) -> None:
            # Counted here; logged (as GENERAL, like the Evaluation) where it ends the evaluation.
            flag_set.regex_timeouts += 1

        return compile_constraint(
            constraint, defaults=self.defaults, regex_timeout=self.regex_timeout, on_error=on_error
        )

    def segment(self, key: str, ref: str | int) -> Predicate | None:
        """The segment's predicate, ``None`` when no such segment exists."""
        segment = self.by_id.get(ref) if isinstance(ref, int) else self.by_name.get(ref)
        if segment is None and isinstance(ref, str) and ref.isdigit():
            segment = self.by_id.get(int(ref))
        if segment is None:
            return None
        predicate = self.segment_predicates.get(segment.name)
        if predicate is None:
            predicate = _all([self.constraint(key, c) for c in segment.constraints]) or _always
            self.segment_predicates[segment.name] = predicate
        return predicate

    def compile(self, compiled: _CompiledFlag, now: dt.datetime) -> None:
        flag = compiled.flag
        key = flag.key
        compiled.enabled = flag.enabled_at(now)
        compiled.flag_variants = _Variants(flag.variants, key) if flag.variants else None
        by_name = {v.name: i for i, v in enumerate(flag.variants)}
        compiled.rules = tuple(
            self.rule(compiled, position, rule, by_name) for position, rule in enumerate(flag.rules)
        )
        compiled.prerequisites = tuple(
            (
                p.flag,
                self.flag_set._compiled.get(p.flag),
                p.enabled,
                frozenset(p.variants),
            )
            for p in flag.prerequisites
        )
        compiled.tenants = {
            tenant: self.outcome(
                compiled,
                override.enabled,
                Reason.TARGETING_MATCH,
                f"tenant:{tenant}",
                compiled.flag_variants,
                by_name.get(override.variant) if override.variant is not None else None,
            )
            for tenant, override in flag.tenants.items()
        }
        compiled.decide = self.decider(compiled)

    def rule(
        self, compiled: _CompiledFlag, position: int, rule: Rule, by_name: Mapping[str, int]
    ) -> _CompiledRule:
        key = compiled.key
        name = rule.id or f"rules[{position}]"
        constraints = tuple((c, self.constraint(key, c)) for c in rule.constraints)
        segments = tuple((ref, self.segment(key, ref)) for ref in rule.segments)
        never = rule.disabled or rule.strategy is not None or any(p is None for _, p in segments)
        checks = [p for _, p in constraints] + [p for _, p in segments if p is not None]
        rollout = rule.rollout
        admit: Predicate | None = None
        split = False
        group = key
        if rollout is not None:
            group = rollout.group_id or key
            admit = _rollout_admit(rollout.percentage, rollout.stickiness, group, self.defaults)
            split = 0 < rollout.percentage < 100  # noqa: PLR2004 -- a partial rollout
        variants = compiled.flag_variants
        fixed: int | None = None
        if rule.variants:
            variants = _Variants(rule.variants, group)
        if rule.variant is not None and compiled.flag_variants is not None:
            # The model admits a fixed variant only among the flag's (never with ``variants``).
            variants, fixed = compiled.flag_variants, by_name.get(rule.variant)
        outcome = self.outcome(compiled, True, Reason.TARGETING_MATCH, name, variants, fixed, split)
        return _CompiledRule(
            name=name,
            rule=rule,
            check=NEVER if never else _all(checks),
            admit=admit,
            outcome=outcome,
            constraints=constraints,
            segments=segments,
        )

    def decider(self, compiled: _CompiledFlag) -> Callable[[Mapping[str, Any]], _Outcome]:
        if not compiled.enabled:
            disabled = self.outcome(compiled, False, Reason.DISABLED, None)
            return lambda context: disabled
        everyone = self.outcome(
            compiled, True, Reason.TARGETING_MATCH, None, compiled.flag_variants
        )
        rules = tuple((r.check, r.admit, r.outcome) for r in compiled.rules if r.check is not NEVER)
        if compiled.rules:
            fallthrough = self.outcome(compiled, False, Reason.DEFAULT, None)
        else:
            # Unleash: a flag that is on with no strategy is on for everyone.
            fallthrough = everyone

        def match_rules(context: Mapping[str, Any]) -> _Outcome:
            for check, admit, outcome in rules:
                if (check is None or check(context)) and (admit is None or admit(context)):
                    return outcome
            return fallthrough

        decide = match_rules
        if len(rules) == 1:
            check, admit, only = rules[0]
            if check is not None and admit is not None:

                def decide(context: Mapping[str, Any]) -> _Outcome:
                    return only if check(context) and admit(context) else fallthrough

            elif check is not None:

                def decide(context: Mapping[str, Any]) -> _Outcome:
                    return only if check(context) else fallthrough

            elif admit is not None:

                def decide(context: Mapping[str, Any]) -> _Outcome:
                    return only if admit(context) else fallthrough

            else:

                def decide(context: Mapping[str, Any]) -> _Outcome:
                    return only

        elif not rules:

            def decide(context: Mapping[str, Any]) -> _Outcome:
                return fallthrough

        tenants = compiled.tenants
        if tenants:
            inner_tenants = decide

            def decide(context: Mapping[str, Any]) -> _Outcome:
                tenant = context.get("tenantId")
                if tenant is not None:
                    override = tenants.get(tenant if tenant.__class__ is str else str(tenant))
                    if override is not None:
                        return override
                return inner_tenants(context)

        if compiled.prerequisites:
            gates = tuple(self.prerequisite(compiled, *p) for p in compiled.prerequisites)
            inner_gates = decide

            def decide(context: Mapping[str, Any]) -> _Outcome:
                for gate, unmet in gates:
                    if not gate(context):
                        return unmet
                return inner_gates(context)

        return decide

    def prerequisite(
        self,
        compiled: _CompiledFlag,
        parent_key: str,
        parent: _CompiledFlag | None,
        expect_enabled: bool,
        variants: frozenset[str],
    ) -> tuple[Predicate, _Outcome]:
        unmet = self.outcome(compiled, False, Reason.DEFAULT, f"prerequisite:{parent_key}")
        # Unleash: a missing parent, or a parent with dependencies of its own (chains
        # and cycles), never satisfies a dependency.
        if parent is None or parent.flag.prerequisites:
            return NEVER, unmet

        def gate(context: Mapping[str, Any]) -> bool:
            outcome = parent.decide(context)
            if not expect_enabled:
                return not outcome.enabled
            if not outcome.enabled:
                return False
            return not variants or parent.variant_name(context, outcome) in variants

        return gate, unmet


def _always(context: Mapping[str, Any]) -> bool:
    return True


# --------------------------------------------------------------------- explain


def _json_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return value


def _evaluation_json(evaluation: Evaluation) -> dict[str, Any]:
    return {
        "key": evaluation.key,
        "value": _json_value(evaluation.value),
        "variant": evaluation.variant,
        "reason": str(evaluation.reason),
        "rule": evaluation.rule,
        "enabled": evaluation.enabled,
        "error_code": evaluation.error_code,
        "error_message": evaluation.error_message,
    }


def _constraint_json(constraint: Constraint, matched: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "context": constraint.context,
        "operator": str(constraint.operator),
        "inverted": constraint.inverted,
        "case_insensitive": constraint.case_insensitive,
        "matched": matched,
    }
    if constraint.value is not None:
        out["value"] = constraint.value
    else:
        out["values"] = list(constraint.values)
    return out


def _bucket(context: Mapping[str, Any], stickiness: str, group: str) -> int | None:
    fields = ("userId", "sessionId") if stickiness == "default" else (stickiness,)
    if stickiness == "random":
        return None
    for field in fields:
        value = text_of(context.get(field))
        if value:
            return normalized_hash(group, value)
    return None


def _explain_steps(  # noqa: PLR0912 -- one step per stage of the evaluation
    compiled: _CompiledFlag, context: Mapping[str, Any], evaluation: Evaluation
) -> list[dict[str, Any]]:
    flag = compiled.flag
    steps: list[dict[str, Any]] = [
        {
            "step": "kill_switch",
            "enabled": compiled.enabled,
            "stored": flag.enabled,
            "schedule": [
                {"at": change.at.isoformat(), "enabled": change.enabled} for change in flag.schedule
            ],
        }
    ]
    if not compiled.enabled:
        return steps
    for parent_key, parent, expect_enabled, variants in compiled.prerequisites:
        step: dict[str, Any] = {
            "step": "prerequisite",
            "flag": parent_key,
            "expected_enabled": expect_enabled,
            "variants": sorted(variants),
        }
        if parent is None:
            step.update(met=False, why="no such flag")
        elif parent.flag.prerequisites:
            step.update(met=False, why="the prerequisite has prerequisites of its own")
        else:
            outcome = parent.decide(context)
            name = parent.variant_name(context, outcome)
            if not expect_enabled:
                met = not outcome.enabled
            else:
                met = outcome.enabled and (not variants or name in variants)
            step.update(met=met, parent_enabled=outcome.enabled, parent_variant=name)
        steps.append(step)
        if not step["met"]:
            return steps
    if compiled.tenants:
        tenant = context.get("tenantId")
        override = None if tenant is None else compiled.tenants.get(str(tenant))
        steps.append(
            {
                "step": "tenant_override",
                "applied": override is not None,
                "enabled": None if override is None else override.enabled,
            }
        )
        if override is not None:
            return [*steps, _variant_step(evaluation)]
    if not compiled.rules:
        steps.append({"step": "rules", "why": "no rules: on for everyone"})
    for rule in compiled.rules:
        step = {"step": "rule", "rule": rule.name}
        if rule.rule.disabled:
            step.update(matched=False, why="disabled")
            steps.append(step)
            continue
        if rule.rule.strategy is not None:
            step.update(matched=False, why=f"strategy {rule.rule.strategy!r} is not supported")
            steps.append(step)
            continue
        constraints = [_constraint_json(c, p(context)) for c, p in rule.constraints]
        segments = [
            {"segment": ref, "found": p is not None, "matched": p is not None and p(context)}
            for ref, p in rule.segments
        ]
        admitted = all(c["matched"] for c in constraints) and all(s["matched"] for s in segments)
        step.update(constraints=constraints, segments=segments)
        rollout = rule.rule.rollout
        if rollout is not None:
            group = rollout.group_id or compiled.key
            in_rollout = admitted and (rule.admit is None or rule.admit(context))
            step["rollout"] = {
                "percentage": rollout.percentage,
                "stickiness": rollout.stickiness,
                "group_id": group,
                "bucket": _bucket(context, rollout.stickiness, group),
                "admitted": in_rollout,
            }
            admitted = in_rollout
        step["matched"] = admitted
        steps.append(step)
        if admitted:
            break
    steps.append(_variant_step(evaluation))
    return steps


def _variant_step(evaluation: Evaluation) -> dict[str, Any]:
    return {
        "step": "variant",
        "variant": evaluation.variant,
        "by": None
        if evaluation.variant is None
        else "override"
        if evaluation.rule == "variant-override"
        else "weight",
    }
