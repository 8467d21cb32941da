"""The ``Flags`` facade an application holds: typed evaluation over a swappable compiled set."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Final

from bastion.flags._engine import FlagSet, _log_error
from bastion.flags._evaluation import Evaluation, EvaluationContext, Reason
from bastion.flags._model import Flag, FlagType

__all__ = ["UNKNOWN_FLAG", "Flags"]

Context = EvaluationContext | Mapping[str, Any] | None
UNKNOWN_FLAG: Final = "<unknown>"
"""The key evaluations of missing flags are counted under: a caller asking for
arbitrary keys cannot grow the metric's label set."""
_NO_DEFAULT: Any = object()
_LOGGED_HERE: Final = frozenset({"FLAG_NOT_FOUND", "TYPE_MISMATCH", "INVALID_CONTEXT"})
"""Error codes found outside the engine, so logged here; the engine logs its own
(``PARSE_ERROR``, ``GENERAL``) where they happen."""


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
        code = evaluation.error_code
        if code in _LOGGED_HERE:
            # The message names the flag and the kind of fault, never a context value;
            # logged at most once a minute per flag (shared with the engine's errors).
            # A missing flag's message would repeat the caller's key, logged once already.
            message = "no such flag" if code == "FLAG_NOT_FOUND" else evaluation.error_message
            _log_error(key, code, message or code, known=key in self._set)
        if code == "FLAG_NOT_FOUND":
            key = UNKNOWN_FLAG
        self._count(key, evaluation.reason)
        return evaluation

    # ----------------------------------------------------------------- evaluating

    def is_enabled(self, key: str, context: Context = None) -> bool:
        """Whether the flag is on for the context; ``False`` when there is no such flag."""
        flag_set = self._set
        enabled, reason = flag_set.decide(key, context)
        if reason is Reason.ERROR and key not in flag_set:
            # Any other ERROR was logged by the engine; a missing flag is found here.
            _log_error(key, "FLAG_NOT_FOUND", "no such flag", known=False)
            self._count(UNKNOWN_FLAG, reason)
        else:
            self._count(key, reason)
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
        self,
        key: str,
        default: Any,
        context: Context = None,
        *,
        expected: FlagType | None = None,
        convert: Callable[[Any], Any] | None = None,
    ) -> Evaluation:
        """A typed evaluation, as OpenFeature resolves one.

        A boolean flag asked for another type serves its variant's value (Unleash's
        flags carry values as variant payloads). A value that is not of the
        ``expected`` type, or that ``convert`` refuses, gives ``default`` with reason
        ``ERROR`` and code ``TYPE_MISMATCH`` (counted and logged as such).

        Args:
            key: the flag.
            default: the caller's default.
            context: who is asking.
            expected: the type the caller wants; ``None``: any.
            convert: with ``expected``, narrows the value to what the caller takes
                (an integer from a whole number); returns ``None`` for a value it cannot.
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
        flag_type = flag.type if flag is not None else "unknown"
        mismatch = None
        if not _fits(expected, value):
            mismatch = f"flag {key!r} is a {flag_type} flag, asked for a {expected}"
        elif convert is not None:
            value = convert(value)
            if value is None:
                mismatch = f"flag {key!r} does not serve a {expected} of the kind asked for"
        if mismatch is not None:
            evaluation = Evaluation(
                key=key,
                value=default,
                variant=evaluation.variant,
                reason=Reason.ERROR,
                rule=evaluation.rule,
                error_code="TYPE_MISMATCH",
                error_message=mismatch,
                enabled=evaluation.enabled,
            )
        elif value is not evaluation.value:
            evaluation = dataclasses.replace(evaluation, value=value)
        return self._counted(evaluation)

    def failure(self, key: str, default: Any, code: str, message: str) -> Evaluation:
        """An ``ERROR`` evaluation for a fault found before the engine ran, counted and logged.

        For callers that check the context themselves (the OpenFeature provider's
        ``INVALID_CONTEXT``), so that every ``ERROR`` shows in the metric and the log.

        Args:
            key: the flag asked for.
            default: the caller's default, served.
            code: OpenFeature's error code (``INVALID_CONTEXT``).
            message: what went wrong, without context values (it is logged).
        """
        evaluation = Evaluation(
            key=key,
            value=default,
            variant=None,
            reason=Reason.ERROR,
            error_code=code,
            error_message=message,
        )
        # A key the set does not hold is counted under "<unknown>", as a missing flag is.
        counted = key if key in self._set else UNKNOWN_FLAG
        _log_error(key, code, message, known=counted != UNKNOWN_FLAG)
        self._count(counted, Reason.ERROR)
        return evaluation

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
