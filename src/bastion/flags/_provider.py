"""The OpenFeature provider: bastion's flags behind the vendor-neutral API.

Example:
    >>> from openfeature import api
    >>> from bastion.flags import BastionProvider
    >>> api.set_provider(BastionProvider(app.state.bastion.flags.flags))
    >>> client = api.get_client()
    >>> client.get_boolean_value("new-editor", False, EvaluationContext("user-1"))
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final, TypeVar

from openfeature.evaluation_context import EvaluationContext as OpenFeatureContext
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import FlagResolutionDetails, FlagValueType, Reason
from openfeature.provider import AbstractProvider, Metadata

from bastion.errors import InvalidInput
from bastion.flags._dependencies import context_from_mapping
from bastion.flags._evaluation import Evaluation, EvaluationContext
from bastion.flags._flags import Flags
from bastion.flags._model import FlagType

__all__ = ["PROVIDER_NAME", "BastionProvider", "to_evaluation_context"]

PROVIDER_NAME: Final = "bastion"

_ERROR_CODES: Final = {code.value: code for code in ErrorCode}
_REASONS: Final = {reason.value: reason for reason in Reason}

T = TypeVar("T")
ObjectValue = Sequence[FlagValueType] | Mapping[str, FlagValueType]


def to_evaluation_context(context: OpenFeatureContext | None) -> EvaluationContext:
    """Translate an OpenFeature context into bastion's.

    The targeting key is ``userId``; attributes are context fields by their
    canonical (``tenantId``, ``remoteAddress``...) or snake_case (``tenant_id``,
    ``ip``...) names, anything else a custom property.

    Raises:
        InvalidInput: an attribute bastion reads has the wrong kind of value.
    """
    if context is None:
        return EvaluationContext()
    translated = context_from_mapping(context.attributes, field="attributes")
    if context.targeting_key:
        translated.user_id = context.targeting_key
    return translated


class BastionProvider(AbstractProvider):
    """An OpenFeature provider that evaluates bastion's flags in process.

    It holds the app's :class:`~bastion.flags.Flags`, which the runtime keeps
    current, so a flag changed on any instance is served here without the
    provider knowing. Evaluations report OpenFeature's reasons, the variant,
    and the rule that decided as the ``rule`` flag metadata; a missing flag
    (``FLAG_NOT_FOUND``), a value of another type (``TYPE_MISMATCH``) or an
    unusable context (``INVALID_CONTEXT``) resolve to the caller's default.

    Args:
        flags: the flags to evaluate (``bastion.flags.flags_runtime(app).flags``).
    """

    def __init__(self, flags: Flags) -> None:
        super().__init__()
        self._flags = flags

    def get_metadata(self) -> Metadata:
        """Return the provider's name, ``bastion``."""
        return Metadata(name=PROVIDER_NAME)

    def resolve_boolean_details(
        self,
        flag_key: str,
        default_value: bool,
        evaluation_context: OpenFeatureContext | None = None,
    ) -> FlagResolutionDetails[bool]:
        """Resolve a boolean flag."""
        return self._resolve(flag_key, default_value, evaluation_context, FlagType.BOOLEAN, _bool)

    def resolve_string_details(
        self,
        flag_key: str,
        default_value: str,
        evaluation_context: OpenFeatureContext | None = None,
    ) -> FlagResolutionDetails[str]:
        """Resolve a string flag."""
        return self._resolve(flag_key, default_value, evaluation_context, FlagType.STRING, _str)

    def resolve_integer_details(
        self,
        flag_key: str,
        default_value: int,
        evaluation_context: OpenFeatureContext | None = None,
    ) -> FlagResolutionDetails[int]:
        """Resolve a number flag whose value is whole (``TYPE_MISMATCH`` otherwise)."""
        return self._resolve(flag_key, default_value, evaluation_context, FlagType.NUMBER, _int)

    def resolve_float_details(
        self,
        flag_key: str,
        default_value: float,
        evaluation_context: OpenFeatureContext | None = None,
    ) -> FlagResolutionDetails[float]:
        """Resolve a number flag."""
        return self._resolve(flag_key, default_value, evaluation_context, FlagType.NUMBER, _float)

    def resolve_object_details(
        self,
        flag_key: str,
        default_value: ObjectValue,
        evaluation_context: OpenFeatureContext | None = None,
    ) -> FlagResolutionDetails[ObjectValue]:
        """Resolve a JSON flag whose value is an object or an array."""
        return self._resolve(flag_key, default_value, evaluation_context, FlagType.JSON, _object)

    def _resolve(
        self,
        key: str,
        default: T,
        context: OpenFeatureContext | None,
        expected: FlagType,
        convert: Any,
    ) -> FlagResolutionDetails[T]:
        try:
            translated = to_evaluation_context(context)
        except InvalidInput as exc:
            # Counted and logged with the flag's key and the kind of fault only; the
            # attribute names go back to the caller, who chose them.
            failed = self._flags.failure(
                key, default, "INVALID_CONTEXT", "unusable context attributes"
            )
            names = ", ".join(error.field for error in exc.errors)
            return FlagResolutionDetails(
                value=default,
                reason=Reason.ERROR,
                error_code=ErrorCode.INVALID_CONTEXT,
                error_message=f"{failed.error_message}: {names}",
            )
        evaluation = self._flags.details(
            key, default, translated, expected=expected, convert=convert
        )
        if evaluation.reason == "ERROR":
            return _failed(evaluation, default)
        return FlagResolutionDetails(
            value=evaluation.value,
            reason=_REASONS.get(evaluation.reason, Reason.UNKNOWN),
            variant=evaluation.variant,
            flag_metadata=_metadata(evaluation),
        )


def _failed(evaluation: Evaluation, default: T) -> FlagResolutionDetails[T]:
    return FlagResolutionDetails(
        value=default,
        reason=Reason.ERROR,
        error_code=_ERROR_CODES.get(evaluation.error_code or "", ErrorCode.GENERAL),
        error_message=evaluation.error_message,
        flag_metadata=_metadata(evaluation),
    )


def _metadata(evaluation: Evaluation) -> dict[str, bool | int | float | str]:
    return {} if evaluation.rule is None else {"rule": evaluation.rule}


# Each converter returns None for a value OpenFeature's type does not admit.
def _bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            return None
        return int(value)
    return value


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _object(value: Any) -> ObjectValue | None:
    if isinstance(value, (Mapping, list, tuple)):
        return value
    return None
