"""The ``Flags`` facade an application holds: typed evaluation over a swappable compiled set."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Final

from bastion.flags._engine import FlagSet
from bastion.flags._evaluation import Evaluation, EvaluationContext, Reason
from bastion.flags._model import Flag, FlagType

__all__ = ["UNKNOWN_FLAG", "Flags"]

Context = EvaluationContext | Mapping[str, Any] | None
UNKNOWN_FLAG: Final = "<unknown>"
"""The key evaluations of missing flags are counted under: a caller asking for
arbitrary keys cannot grow the metric's label set."""
_NO_DEFAULT: Any = object()


def _fits(kind: FlagType, value: Any) -> bool:
    if kind is FlagType.BOOLEAN:
        return isinstance(value, bool)
    if kind is FlagType.STRING:
        return isinstance(value, str)
    if kind is FlagType.NUMBER:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True


def _variant_value(flag: Flag, name: str) -> Any:
    for variant in (*flag.variants, *(v for rule in flag.rules for v in rule.variants)):
        if variant.name == name:
            return variant.value
    return None


class Flags:
    """The flags an application evaluates, swapped atomically when the store changes.

    Every evaluation is counted by flag and reason (see :meth:`evaluation_counts`);
    none raises: a missing flag, a value of the wrong type or a failure gives the
    caller's default with reason ``ERROR``.

    Example:
        >>> flags = Flags(FlagSet.from_flags([Flag(key="beta", enabled=True)]))
        >>> flags.is_enabled("beta", EvaluationContext(user_id="42"))
        True
        >>> flags.get_string("missing", "fallback")
        'fallback'
    """

    __slots__ = ("_counts", "_set")

    def __init__(self, flag_set: FlagSet | None = None) -> None:
        self._set = flag_set if flag_set is not None else FlagSet.from_flags(())
        self._counts: dict[tuple[str, str], int] = {}

    @property
    def flag_set(self) -> FlagSet:
        """The compiled snapshot evaluations run on."""
        return self._set

    @property
    def revision(self) -> int:
        """The store revision of that snapshot."""
        return self._set.revision

    def replace(self, flag_set: FlagSet) -> None:
        """Serve ``flag_set`` from now on (one assignment: evaluations never see half a set)."""
        self._set = flag_set

    def _count(self, key: str, reason: str) -> None:
        counted = (key, reason)
        counts = self._counts
        counts[counted] = counts.get(counted, 0) + 1

    def _counted(self, evaluation: Evaluation) -> Evaluation:
        key = evaluation.key
        if evaluation.error_code == "FLAG_NOT_FOUND":
            key = UNKNOWN_FLAG
        self._count(key, evaluation.reason)
        return evaluation

    # ----------------------------------------------------------------- evaluating

    def is_enabled(self, key: str, context: Context = None) -> bool:
        """Whether the flag is on for the context; ``False`` when there is no such flag."""
        flag_set = self._set
        enabled, reason = flag_set.decide(key, context)
        self._count(key if reason is not Reason.ERROR or key in flag_set else UNKNOWN_FLAG, reason)
        return enabled

    def evaluate(
        self, key: str, context: Context = None, *, default: Any = _NO_DEFAULT
    ) -> Evaluation:
        """The flag's value, variant, reason and deciding rule for the context.

        Args:
            key: the flag.
            context: who is asking (an :class:`EvaluationContext`, or Unleash's shape).
            default: served on ``ERROR`` (and when the flag has no default); omitted:
                the flag's own default.
        """
        return self._counted(self._set.evaluate(key, context, default=default))

    def variant(self, key: str, context: Context = None) -> Evaluation:
        """The variant served (``Evaluation.variant``; ``None`` when none), with its value."""
        return self.evaluate(key, context)

    def details(
        self, key: str, default: Any, context: Context = None, *, expected: FlagType | None = None
    ) -> Evaluation:
        """A typed evaluation, as OpenFeature resolves one.

        A boolean flag asked for another type serves its variant's value (Unleash's
        flags carry values as variant payloads). A value that is not of the
        ``expected`` type gives ``default`` with reason ``ERROR`` and code ``TYPE_MISMATCH``.

        Args:
            key: the flag.
            default: the caller's default.
            context: who is asking.
            expected: the type the caller wants; ``None``: any.
        """
        flag_set = self._set
        evaluation = flag_set.evaluate(key, context, default=default)
        if evaluation.reason is Reason.ERROR or expected is None:
            return self._counted(evaluation)
        flag = flag_set.flag(key)
        value = evaluation.value
        if flag is not None and flag.type is FlagType.BOOLEAN and expected is not FlagType.BOOLEAN:
            value = (
                default if evaluation.variant is None else _variant_value(flag, evaluation.variant)
            )
            if value is None:
                value = default
        if not _fits(expected, value):
            flag_type = flag.type if flag is not None else "unknown"
            evaluation = Evaluation(
                key=key,
                value=default,
                variant=evaluation.variant,
                reason=Reason.ERROR,
                rule=evaluation.rule,
                error_code="TYPE_MISMATCH",
                error_message=f"flag {key!r} is a {flag_type} flag, asked for a {expected}",
                enabled=evaluation.enabled,
            )
        elif value is not evaluation.value:
            evaluation = dataclasses.replace(evaluation, value=value)
        return self._counted(evaluation)

    def get_boolean(self, key: str, default: bool, context: Context = None) -> bool:
        """The flag's boolean value; ``default`` when missing or not a boolean."""
        return bool(self.details(key, default, context, expected=FlagType.BOOLEAN).value)

    def get_string(self, key: str, default: str, context: Context = None) -> str:
        """The flag's string value; ``default`` when missing or not a string."""
        value: str = self.details(key, default, context, expected=FlagType.STRING).value
        return value

    def get_number(self, key: str, default: float, context: Context = None) -> float:
        """The flag's number value; ``default`` when missing or not a number."""
        value: float = self.details(key, default, context, expected=FlagType.NUMBER).value
        return value

    def get_json(self, key: str, default: Any, context: Context = None) -> Any:
        """The flag's JSON value; ``default`` when missing."""
        return self.details(key, default, context, expected=FlagType.JSON).value

    def client_flags(self, context: Context) -> dict[str, Evaluation]:
        """The client-visible flags evaluated for the context (what front ends receive)."""
        flag_set = self._set
        return {
            key: self._counted(flag_set.evaluate(key, context))
            for key in flag_set.client_visible_keys()
        }

    def explain(self, key: str, context: Context = None) -> dict[str, Any]:
        """A JSON-able account of the evaluation, step by step (see :meth:`FlagSet.explain`)."""
        return self._set.explain(key, context)

    def evaluation_counts(self) -> dict[tuple[str, str], int]:
        """Evaluations so far by (flag key or ``"<unknown>"``, reason), since start."""
        return {(key, str(reason)): n for (key, reason), n in self._counts.items()}
