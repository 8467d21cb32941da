"""What an evaluation takes (the context) and returns (value, variant, reason, rule)."""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["EMAIL_DOMAIN", "Evaluation", "EvaluationContext", "Reason", "email_domain"]

EMAIL_DOMAIN: Final = "emailDomain"
"""The context field derived from ``email`` when a context does not give it."""


def email_domain(email: Any) -> str | None:
    """The lower-cased domain of an ``email`` context value; ``None`` when it has none."""
    if not isinstance(email, str) or "@" not in email:
        return None
    return email.rpartition("@")[2].lower()


class Reason(enum.StrEnum):
    """Why a value was served: OpenFeature's resolution reasons."""

    TARGETING_MATCH = "TARGETING_MATCH"
    """A rule, tenant override or variant override admitted the context as a whole."""
    SPLIT = "SPLIT"
    """A percentage rollout or a weighted variant pick decided."""
    DEFAULT = "DEFAULT"
    """No rule admitted the context (or a prerequisite was unmet): the default served."""
    DISABLED = "DISABLED"
    """The kill switch is off."""
    ERROR = "ERROR"
    """The flag is missing or malformed, or the context could not be evaluated."""


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One flag's answer for one context.

    Attributes:
        key: the flag.
        value: what to use: ``True``/``False`` for a boolean flag, else the
            variant's value, or the default.
        variant: the variant served, ``None`` when none (the default, a boolean
            flag without variants).
        reason: why.
        rule: what decided: ``"rules[0]"`` or the rule's id, ``"tenant:<id>"``,
            ``"prerequisite:<key>"``, ``"variant-override"``; ``None`` when nothing matched.
        error_code: with reason ``ERROR``, OpenFeature's code: ``FLAG_NOT_FOUND``,
            ``TYPE_MISMATCH``, ``INVALID_CONTEXT``, ``PARSE_ERROR``, ``GENERAL``.
        error_message: with reason ``ERROR``, a message without context values.
        enabled: whether the flag is on for the context (``value`` of a boolean flag).
    """

    key: str
    value: Any
    variant: str | None
    reason: Reason
    rule: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    enabled: bool = False


@dataclass(slots=True)
class EvaluationContext:
    """Who is asking, in bastion's names; built per request by ``flag_context``.

    Attributes:
        user_id: the principal's user (or API key) id; ``userId`` in constraints.
        session_id: ``sessionId``.
        tenant_id: ``tenantId``; also selects the flag's tenant override.
        roles: ``roles``; ``IN`` matches when any role is listed.
        email: ``email``; its domain is ``emailDomain``.
        ip: the client address; ``remoteAddress``.
        environment: ``environment``; ``flags.environment`` when ``None``.
        app_name: ``appName``.
        app_version: ``appVersion``, for the semver operators.
        current_time: ``currentTime``; now when ``None``.
        properties: any other field, by name.
    """

    user_id: str | None = None
    session_id: str | None = None
    tenant_id: str | None = None
    roles: Sequence[str] = ()
    email: str | None = None
    ip: str | None = None
    environment: str | None = None
    app_name: str | None = None
    app_version: str | None = None
    current_time: dt.datetime | None = None
    properties: Mapping[str, Any] = field(default_factory=dict)
    _flat: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def flat(self) -> dict[str, Any]:
        """The context as one dict of canonical names, made once and reused.

        Treat the context as immutable once evaluated: the dict is cached.
        """
        flat = self._flat
        if flat is None:
            # Plain assignments: this runs once per request, on the hot path of every
            # request that asks for a flag.
            flat = dict(self.properties) if self.properties else {}
            if self.user_id is not None:
                flat["userId"] = self.user_id
            if self.session_id is not None:
                flat["sessionId"] = self.session_id
            if self.tenant_id is not None:
                flat["tenantId"] = self.tenant_id
            if self.ip is not None:
                flat["remoteAddress"] = self.ip
            if self.environment is not None:
                flat["environment"] = self.environment
            if self.app_name is not None:
                flat["appName"] = self.app_name
            if self.app_version is not None:
                flat["appVersion"] = self.app_version
            if self.current_time is not None:
                flat["currentTime"] = self.current_time
            if self.roles:
                flat["roles"] = tuple(self.roles)
            email = self.email
            if email is not None:
                flat["email"] = email
                domain = email_domain(email)
                # An emailDomain given among the properties is the caller's word: kept.
                if domain is not None and EMAIL_DOMAIN not in flat:
                    flat[EMAIL_DOMAIN] = domain
            self._flat = flat
        return flat
